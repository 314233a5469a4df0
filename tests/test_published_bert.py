"""A real published BERT (all-MiniLM-L6-v2: Google's uncased vocabulary, [UNK]=100, [CLS]=101 ...) through
bertpipe: its vocabulary everywhere (tokenizer, masking, shards), every layout such checkpoints come in as the
fine-tuning encoder, a newcomer's fine-tune and `predict`, and continued pretraining whose first MLM loss equals
transformers' on the same batch and weights."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from conftest import ROOT, shard_config
from test_pretrain import BIN, run, why

from pipeline.cli import main
from pipeline.collate import MaskingConfig, MLMCollator
from pipeline.config import load_config
from pipeline.dataset import PretrainingLoader, ShardSet
from pipeline.hf_interop import load_hf
from pipeline.log import setup_logging
from pipeline.shard import ShardConfig, build_shards
from pipeline.tracking import read_metrics
from recipes import bert
from recipes.base import FinetuneConfig
from recipes.tasks import TASKS, WordPieceEncoder, read_splits
from tokenization import load_tokenizer, special_ids

GOOGLE = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
LITERALS = "a [MASK] of [CLS] text [SEP] with [PAD] and [UNK] and [unused5] [unused120] written in it"


def sst2_sentences(data: Path, n: int = 64) -> list[str]:
    lines = (data / "finetune" / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    return [line.split("\t")[1] for line in lines]


def reserved_by_name(tok) -> set[int]:
    """What the vocabulary itself says is not a word piece: the five specials and every [unusedN]."""
    return {i for t, i in tok.get_vocab().items() if t in GOOGLE or re.fullmatch(r"\[unused\d+\]", t)}


# ---- the vocabulary ----------------------------------------------------------------------------------------


def test_google_layout_specials_are_found_by_name(minilm):
    tok = load_tokenizer(minilm)
    ids = special_ids(tok)
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask, ids.vocab_size) == (0, 100, 101, 102, 103, 30_522)
    assert set(ids.reserved) == reserved_by_name(tok) and len(ids.reserved) == 5 + 994
    assert ids.num_unused == 994 and ids.reserved[:100] == list(range(100))  # [PAD], [unused0..98], [UNK]
    assert ids.regular_ids[0] == 999 and len(ids.regular_ids) == 30_522 - 999


@pytest.mark.parametrize("config", ["with tokenizer_config.json", "vocab.txt alone"])
def test_a_vocab_txt_directory_tokenizes_as_the_published_tokenizer(minilm, data, tmp_path, caplog, config):
    shutil.copy(minilm / "vocab.txt", tmp_path / "vocab.txt")
    if config.startswith("with"):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    with caplog.at_level(logging.INFO, logger="tokenization.wordpiece"):
        ours = load_tokenizer(tmp_path)
    stated = "lowercasing (uncased), since none of its entries has an uppercase letter" in caplog.text
    assert stated == (config == "vocab.txt alone")
    published = transformers.BertTokenizerFast.from_pretrained(minilm)
    texts = sst2_sentences(data) + ["Naïve CAFÉ in Zürich, 東京 and don't!"]
    assert [e.ids for e in ours.encode_batch(texts)] == published(texts)["input_ids"]
    assert special_ids(ours) == special_ids(load_tokenizer(minilm))


def test_a_cased_vocab_txt_keeps_case_and_says_so(minilm, tmp_path, caplog):
    vocab = (minilm / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab + ["Paris", "London"]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="tokenization.wordpiece"):
        tok = load_tokenizer(tmp_path)
    assert "keeping case (cased), since 2 of its entries have uppercase letters" in caplog.text
    assert tok.encode("Paris", add_special_tokens=False).tokens == ["Paris"]


def test_special_tokens_written_in_text_are_plain_text(minilm, tmp_path):
    """Neither corpus text nor task text can inject a special id or an unused slot, in either layout."""
    from pipeline.config import load_config as load
    from pipeline.vocab import VocabConfig, build_vocab

    own = build_vocab(load(VocabConfig, ROOT / "recipes/vocab/demo.yaml", [f"output_dir={tmp_path / 'v'}",
                                                                         "num_unused=10"]))
    for directory in (minilm, own):
        tok = load_tokenizer(directory)
        reserved = set(special_ids(tok).reserved)
        encoded = tok.encode(LITERALS, add_special_tokens=False)
        assert not reserved & set(encoded.ids), (directory, encoded.tokens)
        assert "[ mask ] of [ cls ]" in tok.decode(encoded.ids)  # the text, as ordinary pieces
        assert not reserved & {i for p in WordPieceEncoder(directory).pieces([LITERALS]) for i in p}
        with_specials = tok.encode(LITERALS).ids  # [CLS] ... [SEP] come only from the template
        assert [i for i in with_specials if i in reserved] == [special_ids(tok).cls, special_ids(tok).sep]


@pytest.mark.parametrize("layout", ["google", "scattered"])
def test_masking_never_chooses_or_draws_a_reserved_id(minilm, data, tmp_path, layout):
    """Google's layout (every reserved id below 999), and one with unused slots after ordinary pieces too."""
    directory = minilm
    if layout == "scattered":
        vocab = (minilm / "vocab.txt").read_text(encoding="utf-8").splitlines()
        (tmp_path / "vocab.txt").write_text("\n".join([*vocab, "[unused994]", "zyzzyva", "[unused995]"]) + "\n")
        directory = tmp_path
    tok = load_tokenizer(directory)
    sp = special_ids(tok)
    if layout == "scattered":
        assert sp.regular[[30_522, 30_523, 30_524]].tolist() == [False, True, False]
    texts = sst2_sentences(data, 512)
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    rows = [np.array([sp.cls, *e.ids, sp.sep], dtype=np.int32) for e in encoded]
    types = [np.zeros(len(r), dtype=np.int8) for r in rows]
    every_random = MLMCollator(sp, MaskingConfig(mask_fraction=0.0, random_fraction=1.0, mlm_probability=0.5,
                                                 max_predictions=80))
    assert every_random.first_regular == (999 if layout == "google" else None)  # the comparison or the lookup
    out = every_random(rows, types, np.zeros(len(rows)), np.random.default_rng(0))
    valid = out["mlm_labels"] != -100
    chosen = torch.gather(out["input_ids"], 1, out["mlm_positions"])[valid]
    assert valid.sum() > 2_000
    assert sp.regular[out["mlm_labels"][valid].numpy()].all()  # never chose [CLS], [SEP] or [UNK]
    assert sp.regular[chosen.numpy()].all()  # random replacements are ordinary pieces only
    assert len(set(chosen.tolist())) > 1_000  # drawn across the vocabulary, not a few ids
    default = MLMCollator(sp, MaskingConfig())(rows, types, np.zeros(len(rows)), np.random.default_rng(0))
    replaced = torch.gather(default["input_ids"], 1, default["mlm_positions"])[default["mlm_labels"] != -100]
    assert 0.75 < float((replaced == GOOGLE["[MASK]"]).float().mean()) < 0.85


# ---- fine-tuning encoders ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "recipe"), [("bert_model", "sst2"), ("pretraining", "sst2"), ("masked_lm", "sst2"),
                                                ("pretraining_bin", "sst2"), ("bert_model", "conll2003")])
def test_every_published_layout_is_a_finetuning_encoder(minilm_layouts, minilm, data, layout, recipe):
    """model.encoder=<HF dir>: the encoder's states equal transformers' BertModel on the same real sentences,
    tokenized by the directory's own files exactly as the published tokenizer does."""
    directory = minilm_layouts[layout]
    cfg = load_config(FinetuneConfig, ROOT / f"recipes/finetune/{recipe}.yaml", [f"model.encoder={directory}"])
    built = bert.build(cfg, TASKS[recipe])
    assert built.describe["size"] == "L6-H384-A12" and built.describe["vocab_size"] == 30_522
    texts = sst2_sentences(data, 8)
    published = transformers.BertTokenizerFast.from_pretrained(minilm)
    ids = [[101, *p, 102] for p in built.encoder.pieces(texts)]
    assert ids == published(texts)["input_ids"]
    batch = published(texts, padding=True, return_tensors="pt")
    reference = transformers.BertModel.from_pretrained(directory, add_pooling_layer=False).eval()
    with torch.no_grad():
        mine = built.net.bert.eval()(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        theirs = reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine.last_hidden_state[real], theirs[real], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_newcomer_finetunes_a_published_bert_and_predicts(minilm, data, tmp_path, cli, monkeypatch):
    """`bertpipe finetune --config recipes/finetune/sst2.yaml model.encoder=<HF dir>`, then `bertpipe predict`."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "sst2-minilm"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["finetune", "--config", str(ROOT / "recipes/finetune/sst2.yaml"), f"model.encoder={minilm}",
                     f"run_dir={run_dir}", "task.max_train=480", "task.max_eval=200", "task.max_len=64",
                     "trainer.max_epochs=3", "trainer.lr=2e-4", "trainer.batch_size=16",
                     "trainer.val_check_interval=1.0", "--quiet"])
    setup_logging(quiet=True)
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"]["encoder"] == str(minilm) and results["model"]["size"] == "L6-H384-A12"
    # majority class of these 200: 0.525; measured: 0.675 after the first of the 3 epochs, 0.805 at the end
    assert results["metrics"]["accuracy"] > 0.62, results["metrics"]
    code, out, _ = cli("predict", "--run", run_dir, "a gorgeous , witty , seductive movie .",
                       "an utter waste of time .")
    assert code == 0
    labels = [line.split("\t")[0] for line in out.splitlines()]
    assert labels == ["positive", "negative"]
    dev = read_splits(load_config(FinetuneConfig, run_dir / "config.yaml").task, TASKS["sst2"])["dev"]
    assert len(dev) == 200


# ---- continued pretraining ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_published_weights(minilm_layouts, wiki_files, tmp_path):
    """shard with the checkpoint's vocabulary, pretrain with model.init_from=<HF dir>: both heads load, the
    first step's MLM loss is transformers' on the same batch and weights, and the export loads back."""
    hf_dir = minilm_layouts["pretraining"]
    shards = Path(build_shards(shard_config(wiki_files[:2], hf_dir, str(tmp_path / "shards"), "rows_per_shard=512")))
    table = pq.read_table(next(shards.glob("shard.*.parquet")), columns=["input_ids"])
    tok = load_tokenizer(hf_dir)
    sp = special_ids(tok)
    rows = table.column("input_ids").to_pylist()
    assert all(r[0] == 101 and r[-1] == 102 for r in rows)
    inner = np.concatenate([np.array(r[1:-1]) for r in rows])
    assert set(inner[~sp.regular[inner]].tolist()) <= {100, 102}  # only [UNK] and the middle [SEP]

    run_dir = tmp_path / "continue"
    proc = run([str(BIN / "bertpipe"), "pretrain", "--config", "recipes/pretrain/continue-hf.yaml",
                f"model.init_from={hf_dir}", f"data.vocab_dir={hf_dir}", f"data.shards={shards}", f"run_dir={run_dir}",
                "model.dropout=0", "precision=fp32", "zero_stage=0", "data.micro_batch=8", "data.global_batch=8",
                "data.loader_workers=0", "max_steps=2", "eval_every=0", "checkpoint_every=0", "track.log_every=1",
                "track.wandb=disabled", "optim.warmup_steps=1"], timeout=900)
    assert proc.returncode == 0, why(proc)
    assert "initialized from" in proc.stderr and "initialized (not in the checkpoint)" not in proc.stderr
    first = next(r for r in read_metrics(run_dir) if r["event"] == "train" and r["step"] == 1)

    masking = MaskingConfig(max_predictions=20)  # what pretrain uses at seq 128
    loader = PretrainingLoader(ShardSet(str(shards)), MLMCollator(sp, masking), 8, workers=0, seed=1234)
    batch = next(iter(loader))
    hf = transformers.BertForPreTraining.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"]).prediction_logits
    picked = torch.gather(logits, 1, batch["mlm_positions"][:, :, None].expand(-1, -1, logits.size(-1)))
    expected = torch.nn.functional.cross_entropy(picked.flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100)
    assert first["mlm_loss"] == pytest.approx(float(expected), rel=1e-5)

    exported = transformers.BertForPreTraining.from_pretrained(run_dir / "export").eval()
    assert exported.config.hidden_size == 384 and exported.config.vocab_size == 30_522
    ours, report = load_hf(run_dir)  # the run directory itself: its last DeepSpeed checkpoint
    assert report.missing == []
    with torch.no_grad():
        theirs = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"]).seq_relationship_logits
        mine = ours.eval()(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask",
                                                    "mlm_positions")}).nsp_logits
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    assert not torch.equal(exported.cls.seq_relationship.weight, hf.cls.seq_relationship.weight)  # it trained


@pytest.mark.slow
def test_shards_of_another_vocabulary_stop_continued_pretraining(minilm, tmp_path):
    """A published model with the demo vocabulary's shards: one line, before any training."""
    from pipeline.vocab import VocabConfig, build_vocab

    vocab = build_vocab(load_config(VocabConfig, ROOT / "recipes/vocab/demo.yaml", [f"output_dir={tmp_path / 'v'}"]))
    build_shards(load_config(ShardConfig, ROOT / "recipes/shard/demo.yaml",
                             [f"vocab_dir={vocab}", f"output_dir={tmp_path / 's'}", "workers=1"]))
    proc = subprocess.run([str(BIN / "bertpipe"), "pretrain", "--config", "recipes/pretrain/continue-hf.yaml",
                           f"model.init_from={minilm}", f"data.vocab_dir={vocab}", f"data.shards={tmp_path / 's'}",
                           f"run_dir={tmp_path / 'run'}", "track.wandb=disabled", "precision=fp32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "was trained with another vocabulary" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_wordpiece_rnn_on_googles_vocabulary_never_generates_a_reserved_token(minilm, data, tmp_path, cli):
    """The label-conditioned LSTM over the published vocabulary, sampled flat (temperature 3): [MASK] and the
    994 [unusedN] slots (3% of the vocabulary) are banned like [PAD], [CLS] and [SEP]."""
    from recipes.base import load_net
    from recipes.rnn import generate

    run_dir = tmp_path / "lm"
    code, _, err = cli("finetune", "--config", ROOT / "recipes/baselines/sst2-generate-lstm.yaml",
                       f"run_dir={run_dir}", f"model.vocab_dir={minilm}", "task.max_train=200", "task.max_eval=50",
                       "trainer.max_epochs=1", "model.rnn.hidden=32", "model.rnn.embed_dim=16", "model.rnn.layers=1",
                       "track.wandb=disabled", "trainer.checkpoint=false", "--quiet")
    assert code == 0, err
    _, encoder, _ = load_net(run_dir)
    assert (encoder.pad_id, encoder.unk_id, encoder.prefix, encoder.special.mask) == (0, 100, [101], 103)
    samples = generate(run_dir, "positive", length=40, num=50, temperature=3.0, seed=0)
    words = " ".join(samples).split()
    assert len(words) > 1000
    assert not any(w.startswith(("[unused", "[MASK]", "[CLS]", "[SEP]", "[PAD]")) for w in words)
    vocab = load_tokenizer(minilm).get_vocab()
    unused = [t for t in vocab if t.startswith("[unused")]
    assert len(unused) == 994 and encoder.tokenizer.decode([vocab[unused[0]]], skip_special_tokens=False) == unused[0]
