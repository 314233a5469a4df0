"""The seq2seq recipe (recipes/seq2seq.py) on Multi30k English -> German: a memorization check of the whole loop
through `fit()`, beam search against greedy decoding, the attention masks, `bertpipe translate` and the
parallel-text reader.

Torch runs on one thread (see tests/test_baselines.py). Vocabularies: 4k cased WordPiece per side from the
Multi30k training captions. Measured on 2 shared CPU cores: the bidirectional GRU with Luong attention
(hidden 128) memorizes the first 100 training pairs in 30 epochs (about 25 s of training) to BLEU 100 with
beam 4 and 99.3 greedy; the whole file takes about 45 s.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import ROOT

from pipeline.config import load_config
from pipeline.errors import BertpipeError
from pipeline.vocab import VocabConfig, build_vocab
from recipes.base import FinetuneConfig, RnnConfig, Seq2seqConfig, fit, load_net
from recipes.seq2seq import PairCollator, PairEncoder, Seq2seq, decode_ids, detokenize, encode_pairs, translate
from recipes.tasks import WordPieceEncoder, get_task

RECIPES = ROOT / "recipes" / "baselines"
PAIRS = 100


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains with one torch thread (conftest.one_thread)."""


def write_pairs(path: Path, sources: list[str], targets: list[str]) -> Path:
    """`<path>.en.gz` and `<path>.de.gz`, one sentence a line."""
    for suffix, lines in ((".en.gz", sources), (".de.gz", targets)):
        with gzip.open(f"{path}{suffix}", "wt", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def vocabs(data, tmp_path_factory) -> dict[str, Path]:
    """4k cased vocabularies of the English and the German training captions (the recipes' settings)."""
    out = tmp_path_factory.mktemp("multi30k-vocab")
    dirs = {}
    for lang in ("en", "de"):
        train = data / "finetune" / "multi30k" / f"train.{lang}.gz"
        cfg = load_config(VocabConfig, ROOT / "recipes" / "vocab" / f"multi30k-{lang}.yaml",
                          [f"corpus.inputs=[{{path: '{train}', format: plain}}]", f"output_dir={out / lang}",
                           "vocab_size=4000"])
        dirs[lang] = build_vocab(cfg)
    return dirs


@pytest.fixture(scope="module")
def pairs(data, tmp_path_factory) -> Path:
    """The first 100 training pairs, as their own files: the memorization test trains and evaluates on them."""
    spec = get_task("multi30k")
    examples = spec.read(data / "finetune" / "multi30k" / "train")[:PAIRS]
    return write_pairs(tmp_path_factory.mktemp("pairs") / "first100", [ex.source for ex in examples],
                       [ex.target for ex in examples])


@pytest.fixture(scope="module")
def memorized(vocabs, pairs, tmp_path_factory) -> Path:
    """A bidirectional GRU + attention run trained to memorize the 100 pairs (Luong: no per-step loop in
    training, so it is the fast variant on a CPU)."""
    run = tmp_path_factory.mktemp("runs") / "memorize"
    cfg = load_config(FinetuneConfig, RECIPES / "multi30k-gru-attention.yaml", [
        f"run_dir={run}", f"task.train={pairs}", f"task.dev={pairs}", f"model.vocab_dir={vocabs['en']}",
        f"model.seq2seq.tgt_vocab_dir={vocabs['de']}", "model.seq2seq.attention=luong", "model.rnn.hidden=128",
        "model.rnn.embed_dim=64", "model.rnn.dropout=0.0", "trainer.accelerator=cpu", "trainer.batch_size=10",
        "trainer.max_epochs=30", "trainer.lr=1e-2", "trainer.warmup_ratio=0.0", "trainer.limit_val_batches=0.2",
        "trainer.checkpoint=false", "track.wandb=disabled"])
    return fit(cfg)


def small_net(vocabs, attention: str, cell: str = "gru", bidirectional: bool = True, layers: int = 1) -> Seq2seq:
    torch.manual_seed(0)
    en, de = WordPieceEncoder(vocabs["en"]), WordPieceEncoder(vocabs["de"])
    return Seq2seq(en.vocab_size, de.vocab_size, en.pad_id, de.pad_id,
                   RnnConfig(cell=cell, hidden=32, embed_dim=16, layers=layers, bidirectional=bidirectional),
                   Seq2seqConfig(attention=attention))


def real_batch(vocabs, data, n: int = 6) -> tuple[dict[str, torch.Tensor], list]:
    """Dev pairs of different lengths, so the sources are padded."""
    examples = get_task("multi30k").read(data / "finetune" / "multi30k" / "val")[:n]
    encoder = PairEncoder(WordPieceEncoder(vocabs["en"]), WordPieceEncoder(vocabs["de"]))
    return PairCollator(0, 0)(encode_pairs(examples, encoder, 64)), examples


# ---- training through fit(): memorization, beam search against greedy --------------------------------


def test_the_whole_loop_memorizes_100_training_pairs(memorized, pairs):
    results = json.loads((memorized / "results.json").read_text())
    assert results["task"] == "multi30k" and results["main_metric"] == "bleu" and results["higher_is_better"]
    assert results["model"]["attention"] == "luong" and results["model"]["bidirectional"]
    assert results["examples"] == {"train": PAIRS, "dev": PAIRS}
    assert results["metrics"]["bleu"] > 90 and results["metrics"]["bleu_greedy"] > 90
    assert {"source", "target"} <= {p.name for p in (memorized / "model").iterdir()}  # both vocabularies saved
    # the same BLEU again from the saved run: translate() on the raw sources, sacrebleu on the raw references
    examples = get_task("multi30k").read(pairs)
    output = translate(memorized, [ex.source for ex in examples], beam=4)
    assert sacrebleu.corpus_bleu(output, [[ex.target for ex in examples]]).score > 90


def test_beam_search_scores_at_least_greedy_and_beam_1_is_greedy(memorized, pairs):
    results = json.loads((memorized / "results.json").read_text())
    assert results["metrics"]["bleu"] >= results["metrics"]["bleu_greedy"]
    net, encoder, _ = load_net(memorized)
    batch = PairCollator(0, 0)(encode_pairs(get_task("multi30k").read(pairs), encoder, 64))
    bos, eos = encoder.target.prefix[0], encoder.target.suffix[0]
    args = (batch["input_ids"], batch["attention_mask"], bos, eos)
    assert net.beam_search(*args, beam=1) == net.greedy(*args)


@pytest.mark.parametrize(("attention", "cell", "bidirectional", "layers"),
                         [("bahdanau", "gru", True, 1), ("luong", "lstm", True, 2), ("none", "gru", False, 2),
                          ("none", "lstm", True, 1)])
def test_beam_1_is_greedy_on_untrained_networks_up_to_the_length_limit(vocabs, data, attention, cell,
                                                                     bidirectional, layers):
    net = small_net(vocabs, attention, cell, bidirectional, layers).eval()
    batch, _ = real_batch(vocabs, data)
    args = (batch["input_ids"], batch["attention_mask"], 2, 3)
    greedy = net.greedy(*args, max_new_tokens=12)
    assert greedy == net.beam_search(*args, beam=1, max_new_tokens=12)
    beam = net.beam_search(*args, beam=3, max_new_tokens=12)
    assert all(len(ids) <= 12 for ids in greedy) and all(len(ids) <= 12 for ids in beam)


def test_decoding_over_googles_vocabulary_never_produces_a_reserved_piece(vocabs, data, minilm):
    """A target vocabulary in Google's layout ([unused0..98] at 1-99, [CLS] 101, [MASK] 103, [unused99..]
    after): with the head pushed towards every reserved id, greedy and beam search still pick none of them."""
    google = WordPieceEncoder(minilm)
    en = WordPieceEncoder(vocabs["en"])
    torch.manual_seed(0)
    net = Seq2seq(en.vocab_size, google.vocab_size, en.pad_id, google.pad_id,
                  RnnConfig(cell="gru", hidden=32, embed_dim=16), Seq2seqConfig(attention="luong")).eval()
    reserved = sorted(set(google.special.reserved) - {google.unk_id, google.suffix[0]})
    assert len(reserved) > 990 and {101, 103, 1, 99} <= set(reserved)
    with torch.no_grad():
        net.head.bias[reserved] = 50.0  # the most likely pieces, unless they are banned
    batch, _ = real_batch(vocabs, data)
    args = (batch["input_ids"], batch["attention_mask"], google.prefix[0], google.suffix[0])
    assert all(set(row) & set(reserved) for row in net.greedy(*args, max_new_tokens=8))  # the test can fail
    net.never_generate(google)
    for rows in (net.greedy(*args, max_new_tokens=8), net.beam_search(*args, beam=3, max_new_tokens=8)):
        assert rows and not any(set(row) & set(reserved) for row in rows)


# ---- attention --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attention", "cell", "bidirectional"),
                         [("bahdanau", "gru", True), ("bahdanau", "lstm", False), ("luong", "gru", True),
                          ("luong", "lstm", False)])
def test_attention_is_a_masked_distribution_and_everything_gets_gradients(vocabs, data, attention, cell,
                                                                         bidirectional):
    net = small_net(vocabs, attention, cell, bidirectional, layers=2)
    batch, _ = real_batch(vocabs, data)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # some sources are padded
    logits, weights = net(batch["input_ids"], batch["attention_mask"], batch["target_ids"])
    assert logits.shape[:2] == weights.shape[:2] == (6, batch["target_ids"].size(1) - 1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert weights.masked_select(~mask[:, None, :].expand_as(weights)).abs().max() == 0  # none on padding
    assert (weights.masked_select(mask[:, None, :].expand_as(weights)) > 0).all()
    logits.logsumexp(-1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    net.eval()  # the step-by-step decoder (decoding, scheduled sampling) computes what the whole-target one does
    full, full_weights = net(batch["input_ids"], batch["attention_mask"], batch["target_ids"])
    steps, step_weights = net.stepwise(batch["target_ids"][:, :-1],
                                       net.encode(batch["input_ids"], batch["attention_mask"]))
    torch.testing.assert_close(full, steps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_weights, step_weights, atol=1e-5, rtol=1e-5)


def test_without_attention_the_bridged_final_state_is_the_only_context(vocabs, data):
    net = small_net(vocabs, "none", "lstm", bidirectional=True, layers=2)
    batch, _ = real_batch(vocabs, data)
    logits, weights = net(batch["input_ids"], batch["attention_mask"], batch["target_ids"], teacher_forcing=0.5)
    assert weights is None and net.bridge.in_features == 2 * 32 and net.bridge.out_features == 32
    state = net.encode(batch["input_ids"], batch["attention_mask"]).state
    assert state[0].shape == state[1].shape == (2, 6, 32)  # (layers, B, H) for h and c
    logits.sum().backward()
    assert net.bridge.weight.grad.abs().sum() > 0


# ---- detokenization, the CLI, the reader, the BERT encoder -----------------------------------------------


def test_detokenized_references_round_trip(vocabs, data):
    encoder = WordPieceEncoder(vocabs["de"])
    references = [ex.target for ex in get_task("multi30k").read(data / "finetune" / "multi30k" / "val")]
    texts = [decode_ids(encoder, ids) for ids in encoder.pieces(references)]
    assert sum(t == r for t, r in zip(texts, references, strict=True)) / len(references) > 0.95
    assert sacrebleu.corpus_bleu(texts, [references]).score > 99
    assert detokenize(['"', "Hallo", "##chen", '"', ",", "sagt", "(", "er", ")", "im", "T", "-", "Shirt", "."]) == \
        '"Hallochen", sagt (er) im T-Shirt.'
    assert detokenize(["##en", "Hund", "##e", "."]) == "en Hunde."  # a stray continuation opens a word


def test_translate_command(cli, memorized, monkeypatch):
    code, out, _ = cli("translate", "--run", memorized, "Two young, White males are outside near many bushes.")
    assert code == 0 and out.strip() == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    monkeypatch.setattr("sys.stdin", io.StringIO("A man rides a bike.\n\nA dog runs.\n"))
    code, out, _ = cli("translate", "--run", memorized, "--beam", "1", "--max-len", "20", "-")
    assert code == 0 and len(out.splitlines()) == 2 and all(line.strip() for line in out.splitlines())
    code, out, err = cli("translate", "--run", memorized.parent / "missing", "A man.")
    assert code != 0 and out == "" and len(err.strip().splitlines()) == 1 and "not a finetune run" in err


def test_the_reader_names_the_file_and_line_where_pairs_break(tmp_path):
    spec = get_task("multi30k")
    path = write_pairs(tmp_path / "short", ["A dog.", "A cat.", "A bird."], ["Ein Hund.", "Eine Katze."])
    with pytest.raises(BertpipeError, match=r"short\.en\.gz:3: no aligned line in .*short\.de\.gz"):
        spec.read(path)
    path = write_pairs(tmp_path / "empty", ["A dog.", "A cat."], ["Ein Hund.", "  "])
    with pytest.raises(BertpipeError, match=r"empty\.de\.gz:2: empty line"):
        spec.read(path)
    assert [ex.target for ex in spec.read(write_pairs(tmp_path / "ok", ["A dog."], ["Ein Hund."]))] == ["Ein Hund."]


def test_a_pretrained_bert_can_be_the_encoder(vocabs, pairs, tmp_path):
    from pipeline.hf_interop import export_hf
    from pipeline.model import BertForPreTraining, from_preset

    torch.manual_seed(0)
    bert = BertForPreTraining(from_preset("tiny", WordPieceEncoder(vocabs["en"]).vocab_size))
    source = export_hf(bert, tmp_path / "bert", vocabs["en"])
    run = fit(load_config(FinetuneConfig, RECIPES / "multi30k-bert-gru.yaml", [
        f"run_dir={tmp_path / 'run'}", f"task.train={pairs}", f"task.dev={pairs}", "task.max_eval=8",
        f"model.encoder={source}", f"model.seq2seq.tgt_vocab_dir={vocabs['de']}", "model.rnn.hidden=32",
        "model.rnn.embed_dim=16", "model.seq2seq.beam=2", "model.seq2seq.max_new_tokens=8", "trainer.max_steps=2",
        "trainer.batch_size=8", "trainer.accelerator=cpu", "trainer.checkpoint=false", "track.wandb=disabled"]))
    results = json.loads((run / "results.json").read_text())
    assert results["model"]["encoder"].startswith(str(source)) and results["inputs"]["encoder"]
    net, _, _ = load_net(run)
    assert net.bert.config.hidden_size == net.bridge.in_features  # [CLS] -> the decoder's first state
    assert len(translate(run, ["A man rides a bike."])) == 1
