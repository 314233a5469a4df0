"""The RNN baseline recipes (recipes/baselines/*.yaml) trained briefly on real data through `bertpipe finetune`,
each against its task's trivial baseline, and the label-conditioned generator through `bertpipe generate`.

Torch runs on one thread here: an RNN's small per-step matrix products gain nothing from a second thread,
and on a shared 2-core machine an OpenMP thread waiting for a busy core made each step 100x slower.

Measured with these settings on 2 shared CPU cores (one thread), WordPiece tokens of the Wikipedia vocabulary:
SST-2 LSTM dev accuracy 0.653 and mean-pooled embeddings 0.767 against the majority class's 0.509 (margins
0.144 and 0.258; asked: 0.08); UD POS BiLSTM word accuracy 0.611 on 500 dev sentences against always-NOUN's
0.153 (margin 0.458; asked: 0.30); CoNLL-2003 BiLSTM entity F1 0.286 on 500 dev sentences against 0 for the
all-O tagger (asked: 0.15). Generation: a label-conditioned LSTM (word vocabulary, 8,000 SST-2 phrases, 4
epochs) writes 100 samples of 12 words per label; each is scored by the summed log-odds (positive vs negative
training texts) of its words, and 0.805 of the 200 land on their conditioning label's side (chance: 0.5;
margin 0.305; asked: 0.15).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pipeline.config import load_config
from recipes.base import FinetuneConfig
from recipes.rnn import generate
from recipes.tasks import TASKS, read_splits, split_words

RECIPES = ROOT / "recipes" / "baselines"
MARGINS = {"sst2": 0.08, "ud_pos": 0.30, "conll2003": 0.15, "generate": 0.15}
SMALL = ["model.rnn.hidden=128", "model.rnn.embed_dim=64", "track.wandb=disabled", "trainer.checkpoint=false",
         "trainer.val_check_interval=1.0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains with one torch thread (conftest.one_thread)."""


def finetune(cli, recipe: str, run_dir: Path, *overrides: str) -> dict:
    code, _, err = cli("finetune", "--config", RECIPES / f"{recipe}.yaml", f"run_dir={run_dir}", "--quiet",
                       *SMALL, *overrides)
    assert code == 0, err
    return json.loads((run_dir / "results.json").read_text())


def dev_split(run_dir: Path) -> list:
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    return read_splits(cfg.task, TASKS[cfg.task.name])["dev"]


@pytest.mark.parametrize(("recipe", "epochs", "lr"), [("sst2-lstm", 3, 2e-3), ("sst2-pooled", 8, 1e-2)])
def test_sst2_beats_the_majority_class(cli, data, wiki_vocab, tmp_path, recipe, epochs, lr):
    results = finetune(cli, recipe, tmp_path / recipe, f"model.vocab_dir={wiki_vocab}", "task.max_train=4000",
                       f"trainer.max_epochs={epochs}", f"trainer.lr={lr}")
    dev = dev_split(tmp_path / recipe)
    majority = max(Counter(ex.label for ex in dev).values()) / len(dev)
    assert results["metrics"]["accuracy"] > majority + MARGINS["sst2"]
    assert results["model"]["kind"] == ("pooled" if recipe.endswith("pooled") else "rnn")


def test_ud_pos_beats_the_most_frequent_tag(cli, data, wiki_vocab, tmp_path):
    results = finetune(cli, "ud_pos-bilstm", tmp_path / "pos", f"model.vocab_dir={wiki_vocab}",
                       "task.max_train=2000", "task.max_eval=500", "trainer.max_epochs=3", "model.rnn.layers=1")
    dev = dev_split(tmp_path / "pos")
    tags = Counter(t for ex in dev for t in ex.tags)
    assert TASKS["ud_pos"].labels[tags.most_common(1)[0][0]] == "NOUN"
    frequent = tags.most_common(1)[0][1] / sum(tags.values())
    assert results["metrics"]["accuracy"] > frequent + MARGINS["ud_pos"]


def test_conll2003_beats_the_all_o_tagger(cli, data, wiki_vocab, tmp_path):
    results = finetune(cli, "conll2003-bilstm", tmp_path / "ner", f"model.vocab_dir={wiki_vocab}",
                       "task.max_train=3000", "task.max_eval=500", "trainer.max_epochs=4", "model.rnn.layers=1")
    assert results["metrics"]["f1"] > 0.0 + MARGINS["conll2003"]  # an all-O tagger finds no entity: F1 0


def test_the_explicit_elman_cell_trains_through_the_same_recipe(cli, data, tmp_path):
    results = finetune(cli, "sst2-rnn", tmp_path / "elman", "model.rnn.explicit=true", "model.rnn.word_vocab=true",
                       "task.max_train=500", "task.max_eval=100", "trainer.max_epochs=1", "model.rnn.hidden=32")
    assert results["model"]["explicit"] and results["model"]["tokenizer"] == "word"
    assert math.isfinite(results["metrics"]["loss"])


def lexicon(examples: list) -> dict[str, float]:
    """Log-odds of each word between positive and negative training texts (add-one smoothing)."""
    counts = [Counter(), Counter()]
    for ex in examples:
        counts[ex.label].update(w.lower() for w in split_words(ex.text))
    words = set(counts[0]) | set(counts[1])
    totals = [sum(c.values()) + len(words) for c in counts]
    return {w: math.log((counts[1][w] + 1) / totals[1]) - math.log((counts[0][w] + 1) / totals[0]) for w in words}


@pytest.mark.slow  # about 90 s on 2 shared cores
def test_generation_has_the_asked_length_and_follows_the_label(cli, data, tmp_path):
    run = tmp_path / "lm"
    results = finetune(cli, "sst2-generate-lstm", run, "model.rnn.word_vocab=true", "model.rnn.layers=1",
                       "task.max_train=8000", "task.max_eval=200", "task.max_len=24", "trainer.max_epochs=4",
                       "trainer.lr=5e-3")
    assert results["metrics"]["perplexity"] > 1 and 0 < results["metrics"]["accuracy"] < 1
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    log_odds = lexicon(read_splits(cfg.task, TASKS["sst2"])["train"])  # the sentences the LM was trained on
    agree = 0
    for label in ("negative", "positive"):
        samples = generate(run, label, length=12, num=100, temperature=0.8, top_k=20, seed=1)
        assert len(samples) == 100 and all(len(s.split()) == 12 for s in samples)
        scores = [sum(log_odds.get(w.lower(), 0.0) for w in s.split()) for s in samples]
        agree += sum((score > 0) == (label == "positive") for score in scores)
    assert agree / 200 > 0.5 + MARGINS["generate"]


def test_generate_command(cli, data, tmp_path):
    run = tmp_path / "tiny-lm"
    finetune(cli, "sst2-generate-lstm", run, "model.rnn.word_vocab=true", "model.rnn.layers=1", "model.rnn.hidden=16",
             "task.max_train=200", "task.max_eval=20", "trainer.max_epochs=1")
    code, out, _ = cli("generate", "--run", run, "--label", "positive", "--length", "7", "--num", "3",
                       "--temperature", "0.8", "--top-k", "20")
    assert code == 0 and [len(line.split()) for line in out.splitlines()] == [7, 7, 7]
    code, _, err = cli("generate", "--run", run, "--label", "neutral")
    assert code != 0 and "neutral" in err


def test_embeddings_from_a_pretrained_bert_are_copied_and_projected(cli, data, wiki_vocab, tmp_path):
    from pipeline.hf_interop import export_hf
    from pipeline.model import BertForPreTraining, from_preset
    from recipes.base import load_net

    torch.manual_seed(0)
    vocab_size = len((wiki_vocab / "vocab.txt").read_text(encoding="utf-8").splitlines())
    bert = BertForPreTraining(from_preset("tiny", vocab_size))
    encoder = export_hf(bert, tmp_path / "bert", wiki_vocab)
    results = finetune(cli, "sst2-lstm", tmp_path / "init", f"model.rnn.init_embeddings={encoder}",
                       "task.max_train=64", "task.max_eval=32", "trainer.max_steps=1", "trainer.lr=1e-9")
    assert results["model"]["embeddings"] == str(encoder) and results["inputs"]["encoder"]
    net, _, _ = load_net(tmp_path / "init")
    source = bert.bert.embeddings.word_embeddings.weight
    assert net.embed.word_embeddings.weight.shape == source.shape  # BERT's width, projected to embed_dim
    assert net.embed.project.out_features == 64
    torch.testing.assert_close(net.embed.word_embeddings.weight, source, atol=1e-6, rtol=0)  # lr ~0: unchanged
