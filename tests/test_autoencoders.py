"""The autoencoder recipes (recipes/baselines/digits-*.yaml, sentences-lstm-*.yaml) trained briefly through
`fit()` on real data: scikit-learn's 8x8 digits (shipped with it, no download) and Wikipedia sentences.

Torch runs on one thread (see tests/test_baselines.py). Measured with these settings on 2 shared CPU cores
(dev split, 269 digits; the mean training image's MSE 0.0721): dev MSE undercomplete 0.016, denoising 0.022,
sparse (KL) 0.016, VAE 0.035, convolutional 0.009, i.e. 0.12-0.48x the mean image's (asked: below 0.6x, VAE
0.7x); the denoising AE's output from masked inputs 0.030 against the masked inputs' own 0.070 (asked: below
0.7x); the KL-sparse code's mean activation 0.060 for rho 0.05 (asked: within 0.05); L1 codes' mean |h| 0.17
against the undercomplete's 2.2 (asked: below 0.5x); linear probes on 16-wide codes 0.94 dev accuracy (chance
0.1; asked: above 0.7). Sentences (wiki_00's 2,816 sentences of 5-20 words, 281 for dev, a word vocabulary,
the first 10 words, 8 epochs): the LSTM AE's teacher-forced token accuracy 0.349 against 0.186 for always the
most frequent training token (margin 0.16; asked: 0.08) and 0.225 when decoded from another sentence's code
(margin 0.12; asked: 0.05); the denoising one (20% of the tokens dropped, lr 3e-3) 0.349 from clean and 0.330
from corrupted inputs (asked: 0.08 above the unigram rate). At lr 6e-3 the denoising run stayed on the unigram
plateau, so its margin rests on that setting; exact matches are still 0 this early.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pipeline.config import load_config
from recipes.base import FinetuneConfig, fit, load_net
from recipes.tasks import TASKS, TaskConfig, read_splits

RECIPES = ROOT / "recipes" / "baselines"
QUICK = ["track.wandb=disabled", "trainer.checkpoint=false", "trainer.max_epochs=30"]
MARGINS = {"mse": 0.6, "vae_mse": 0.7, "denoise": 0.7, "rate": 0.05, "l1": 0.5, "probe": 0.7}
SEQ_MARGINS = {"unigram": 0.08, "code": 0.05}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains with one torch thread (conftest.one_thread)."""


def train(recipe: str, run_dir: Path, *overrides: str) -> dict:
    cfg = load_config(FinetuneConfig, RECIPES / f"{recipe}.yaml", [f"run_dir={run_dir}", *QUICK, *overrides])
    fit(cfg)
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def undercomplete(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("ae") / "undercomplete"
    return run, train("digits-undercomplete", run)


def test_the_digits_task_reads_scikit_learn_and_refuses_anything_else():
    splits = read_splits(TaskConfig(name="digits", train="sklearn:digits", holdout=0.15), TASKS["digits"])
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [1259, 269, 269]
    image = splits["dev"][0].pixels
    assert image.shape == (1, 8, 8) and image.min() >= 0 and image.max() <= 1
    with pytest.raises(Exception, match="task.train must be sklearn:digits"):
        read_splits(TaskConfig(name="digits", train="digits.csv", holdout=0.15), TASKS["digits"])


def test_undercomplete_reconstructs_held_out_digits_and_its_codes_carry_the_labels(undercomplete):
    run, results = undercomplete
    m = results["metrics"]
    assert results["higher_is_better"] is False and results["main_metric"] == "mse"
    assert m["mse"] < MARGINS["mse"] * m["mean_image_mse"]
    assert m["probe_accuracy"] > MARGINS["probe"] and m["pixel_probe_accuracy"] > MARGINS["probe"]
    assert results["splits"]["test"]["mse"] < MARGINS["mse"] * m["mean_image_mse"]
    assert (run / "reconstructions.png").stat().st_size > 1000
    net, _, meta = load_net(run)  # rebuilt from model/: the same reconstructions
    x = read_splits(load_config(FinetuneConfig, run / "config.yaml").task, TASKS["digits"])["dev"][0].pixels[None]
    assert net(x).logits.shape == (1, 1, 8, 8) and meta["kind"] == "autoencoder"


def test_denoising_output_is_closer_to_the_clean_digit_than_its_corrupted_input(tmp_path):
    m = train("digits-denoising", tmp_path / "dae")["metrics"]
    assert m["denoised_mse"] < MARGINS["denoise"] * m["noisy_mse"]
    assert m["mse"] < MARGINS["mse"] * m["mean_image_mse"]
    assert (tmp_path / "dae" / "reconstructions.png").is_file()


def test_sparse_codes_hit_their_target_rate_and_l1_shrinks_the_codes(tmp_path, undercomplete):
    kl = train("digits-sparse", tmp_path / "kl")["metrics"]
    assert abs(kl["code_mean"] - 0.05) < MARGINS["rate"]  # sigmoid codes: their mean is the activation rate
    assert kl["mse"] < MARGINS["mse"] * kl["mean_image_mse"]
    l1 = train("digits-sparse", tmp_path / "l1", "model.autoencoder.sparsity=l1", "model.autoencoder.code_dim=16",
               "model.autoencoder.sparsity_weight=0.1")["metrics"]
    assert l1["code_abs_mean"] < MARGINS["l1"] * undercomplete[1]["metrics"]["code_abs_mean"]


def test_vae_has_a_positive_kl_and_samples_digits_from_its_prior(tmp_path):
    results = train("digits-vae", tmp_path / "vae")
    m = results["metrics"]
    assert m["kl"] > 0 and m["loss"] > m["reconstruction"]  # the negative ELBO = reconstruction + beta * KL
    assert m["mse"] < MARGINS["vae_mse"] * m["mean_image_mse"]
    assert (tmp_path / "vae" / "samples.png").stat().st_size > 1000
    net, _, _ = load_net(tmp_path / "vae")
    samples = net.sample(16, torch.Generator().manual_seed(0))
    assert samples.shape == (16, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    assert samples.std(0).mean() > 0.01  # different z, different images


def test_convolutional_autoencoder_reconstructs_held_out_digits(tmp_path):
    m = train("digits-conv", tmp_path / "conv")["metrics"]
    assert m["mse"] < MARGINS["mse"] * m["mean_image_mse"]
    assert m["probe_accuracy"] > MARGINS["probe"]


SENTENCES = ["track.wandb=disabled", "trainer.checkpoint=false", "model.rnn.word_vocab=true", "model.rnn.hidden=128",
             "model.rnn.embed_dim=64", "model.rnn.bidirectional=true", "model.rnn.dropout=0", "task.max_len=12",
             "trainer.batch_size=16", "trainer.lr=6e-3", "trainer.max_epochs=8"]


def train_sentences(recipe: str, run_dir: Path, data: Path, *overrides: str) -> dict:
    cfg = load_config(FinetuneConfig, RECIPES / f"{recipe}.yaml",
                      [f"run_dir={run_dir}", f"task.data_dir={data}", *SENTENCES, *overrides])
    fit(cfg)
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow  # 45-60 s on 2 shared cores
def test_sequence_autoencoder_rebuilds_held_out_sentences_from_their_code(data, tmp_path):
    results = train_sentences("sentences-lstm-ae", tmp_path / "seq", data)
    m = results["metrics"]
    assert results["main_metric"] == "token_accuracy" and results["higher_is_better"] is True
    assert m["token_accuracy"] > m["unigram_accuracy"] + SEQ_MARGINS["unigram"]
    assert m["token_accuracy"] > m["shuffled_code_accuracy"] + SEQ_MARGINS["code"]  # the code carries the sentence
    assert 0 <= m["exact_match"] <= 1 and 0 < m["greedy_accuracy"] < 1
    assert "reconstructed:" in (tmp_path / "seq" / "examples.txt").read_text()


@pytest.mark.slow  # 45-60 s on 2 shared cores
def test_denoising_sequence_autoencoder_rebuilds_sentences_with_dropped_tokens(data, tmp_path):
    m = train_sentences("sentences-lstm-dae", tmp_path / "dseq", data, "trainer.lr=3e-3")["metrics"]  # 6e-3: stuck
    assert m["token_accuracy"] > m["unigram_accuracy"] + SEQ_MARGINS["unigram"]
    assert m["noisy_token_accuracy"] > m["unigram_accuracy"] + SEQ_MARGINS["unigram"]  # from 20% dropped tokens
    assert "corrupted:" in (tmp_path / "dseq" / "examples.txt").read_text()


def test_token_corruption_keeps_the_bounds_and_shifts_dropped_tokens_out():
    from recipes.autoencoder import corrupt_tokens

    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0], [2, 20, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    dropped, new_mask = corrupt_tokens(ids, mask, "dropout", 0.5, 1, 0, torch.Generator().manual_seed(3))
    for row, new, keep in zip(ids.tolist(), dropped.tolist(), new_mask.tolist(), strict=True):
        kept = new[:sum(keep)]
        assert kept[0] == 2 and kept[-1] == 3 and all(t in row for t in kept) and kept == sorted(kept, key=row.index)
    masked, same = corrupt_tokens(ids, mask, "masking", 0.99, 1, 0)
    assert torch.equal(same, mask) and masked[0, 0] == 2 and masked[0, 5] == 3 and (masked[0, 1:5] == 1).all()
