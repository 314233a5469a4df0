"""Task readers on the real data, label alignment, batching, metrics and bad input (recipes/tasks/)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from seqeval.metrics import f1_score

from pipeline.errors import BertpipeError
from recipes.metrics import TaggingMetrics, classification_metrics
from recipes.tasks import (
    NER_TAGS,
    TASKS,
    Collator,
    TaggedExample,
    TaskConfig,
    TaskDataModule,
    TextExample,
    WordPieceEncoder,
    align_words,
    encode,
    read_splits,
    split_words,
)

FT = "finetune"


def config(data: Path, name: str, **fields) -> TaskConfig:
    paths = {
        "sst2": {"train": "sst2/train.tsv", "dev": "sst2/dev.tsv"},
        "rt_polarity": {"train": "sentence_polarity/rt-polarity"},
        "conll2003": {"train": "conll2003/eng.train", "dev": "conll2003/eng.testa"},
        "ud_pos": {"train": "ud_english_ewt/en_ewt-ud-train.conllu", "dev": "ud_english_ewt/en_ewt-ud-dev.conllu"},
    }[name]
    fields = {k: str(data / FT / v) for k, v in paths.items()} | fields
    return TaskConfig(name=name, data_dir=str(data), **fields)


@pytest.fixture(scope="module")
def encoder(wiki_vocab) -> WordPieceEncoder:
    return WordPieceEncoder(wiki_vocab)


# ---- readers on the real files ---------------------------------------------------------------------------


def test_sst2_reads_every_row(data):
    splits = read_splits(config(data, "sst2"), TASKS["sst2"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 67_349, "dev": 872}
    assert sum(ex.label for ex in splits["dev"]) == 444  # positive; majority class rate 444/872 = 50.9%
    assert splits["dev"][0] == TextExample("one long string of cliches .", 0)  # dev's header says `content`


def test_rt_polarity_split_is_seeded_disjoint_and_complete(data):
    spec = TASKS["rt_polarity"]
    splits = read_splits(config(data, "rt_polarity", holdout=0.1), spec)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8_530, "dev": 1_066, "test": 1_066}
    texts = {k: {ex.text for ex in v} for k, v in splits.items()}
    assert not texts["dev"] & texts["test"]
    assert sum(len(v) for v in splits.values()) == 10_662
    again = read_splits(config(data, "rt_polarity", holdout=0.1), spec)
    assert [ex.text for ex in again["test"]] == [ex.text for ex in splits["test"]]
    other = read_splits(config(data, "rt_polarity", holdout=0.1, split_seed=7), spec)
    assert [ex.text for ex in other["test"]] != [ex.text for ex in splits["test"]]
    with pytest.raises(BertpipeError, match="leave task.dev and task.test empty"):
        read_splits(config(data, "rt_polarity", holdout=0.1, dev=str(data / FT / "sst2/dev.tsv")), spec)


def test_conll_and_conllu_sentences(data):
    ner = read_splits(config(data, "conll2003"), TASKS["conll2003"])
    assert {k: len(v) for k, v in ner.items()} == {"train": 14_041, "dev": 3_250}
    first = ner["train"][0]
    assert first.words[:3] == ["EU", "rejects", "German"]
    assert [NER_TAGS[t] for t in first.tags[:3]] == ["B-ORG", "O", "B-MISC"]

    pos = read_splits(config(data, "ud_pos"), TASKS["ud_pos"])
    assert {k: len(v) for k, v in pos.items()} == {"train": 12_544, "dev": 2_001}
    labels = TASKS["ud_pos"].labels
    assert [labels[t] for t in pos["dev"][0].tags] == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]
    # multiword tokens ("don't" = "do" + "n't") are skipped: every word has a real UPOS tag
    assert all(len(ex.words) == len(ex.tags) for ex in pos["train"])


def test_max_train_is_a_seeded_sample_and_max_eval_a_prefix(data):
    spec = TASKS["sst2"]
    a = read_splits(config(data, "sst2", max_train=100, max_eval=50), spec)
    b = read_splits(config(data, "sst2", max_train=100, max_eval=50), spec)
    assert len(a["train"]) == 100 and a["train"] == b["train"]
    assert a["dev"] == read_splits(config(data, "sst2"), spec)["dev"][:50]


def test_loader_workers_leave_slurm_signals_to_the_training_process(data, encoder):
    """SLURM signals every process of a job (USR1 before its time limit, TERM on preemption or scancel), loader
    workers included: they ignore both, so the training process decides (Lightning checkpoints and requeues) and
    the epoch's batches keep coming, instead of the run dying with "DataLoader worker ... killed by signal".
    The signals come at once, while the workers may still be starting."""
    splits = read_splits(config(data, "sst2", max_train=256, max_eval=8), TASKS["sst2"])
    batches = iter(TaskDataModule(splits, encoder, max_len=32, batch_size=8, num_workers=2).loader("train"))
    try:
        for worker in batches._workers:
            os.kill(worker.pid, signal.SIGUSR1)
            os.kill(worker.pid, signal.SIGTERM)
        assert sum(len(b["input_ids"]) for b in batches) == 256
    finally:
        batches._shutdown_workers()


# ---- label alignment -------------------------------------------------------------------------------------


def test_alignment_on_conll_sentences_with_multi_piece_words(data, encoder):
    sentences = read_splits(config(data, "conll2003", max_eval=400), TASKS["conll2003"])["dev"]
    features = encode(sentences, encoder, max_len=128)
    vocab = encoder.tokenizer
    checked_words = 0
    for ex, f in zip(sentences, features, strict=True):
        pieces = [encoder.pieces([w])[0] for w in ex.words]
        if all(len(p) <= 1 for p in pieces) or -1 in f["word_starts"]:
            continue
        assert f["input_ids"][0] == encoder.prefix[0] and f["input_ids"][-1] == encoder.suffix[0]
        assert len(f["word_starts"]) == len(ex.words) and f["tags"] == ex.tags
        for j, start in enumerate(f["word_starts"]):
            end = f["word_starts"][j + 1] if j + 1 < len(ex.words) else len(f["input_ids"]) - 1
            span = f["input_ids"][start:end]
            assert span == pieces[j] or (not pieces[j] and span == [encoder.unk_id])
            # the first piece starts the word; the rest are ## continuations or the word's own punctuation
            assert not vocab.id_to_token(span[0]).startswith("##")
            checked_words += len(span) > 1
    assert checked_words > 100  # e.g. "1996-08-22" -> 1996 - 08 - 22


def test_words_past_max_len_are_cut_whole_and_marked(encoder):
    ids, starts = align_words(encoder, [[7, 8]] * 10, max_len=8)  # ten words of two pieces each
    assert starts == [1, 3, 5, -1, -1, -1, -1, -1, -1, -1]
    assert len(ids) == 8 and ids[-1] == encoder.suffix[0]
    ids, starts = align_words(encoder, [[], [7]], max_len=8)  # a word without pieces becomes [UNK]
    assert ids == encoder.prefix + [encoder.unk_id, 7] + encoder.suffix and starts == [1, 2]


def test_collator_pads_and_marks(encoder):
    tagged = encode([TaggedExample(["Peter", "Blackburn"], [1, 2]), TaggedExample(["EU"], [3])], encoder, 16)
    batch = Collator(encoder.pad_id)(tagged)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in tagged]
    assert batch["tags"].tolist() == [[1, 2], [3, -100]]
    assert batch["word_starts"][1].tolist() == [1, -1]
    texts = Collator(encoder.pad_id)(encode([TextExample("a fine film", 1), TextExample("dull", 0)], encoder, 16))
    assert texts["labels"].tolist() == [1, 0]


def test_split_words_like_conll():
    assert split_words("Peter Blackburn (U.S) said: co-writer's 1996-08-22!") == [
        "Peter", "Blackburn", "(", "U.S", ")", "said", ":", "co-writer's", "1996-08-22", "!"]


# ---- metrics ---------------------------------------------------------------------------------------------


def test_tagging_metrics_are_seqeval_entity_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    guess = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    ids = {t: i for i, t in enumerate(NER_TAGS)}
    metric = TaggingMetrics(NER_TAGS, "iob2")
    target = torch.tensor([[ids[t] for t in gold[0]], [ids[t] for t in gold[1]] + [-100, -100]])
    preds = torch.tensor([[ids[t] for t in guess[0]], [ids[t] for t in guess[1]] + [0, 0]])
    out = metric(preds, target)
    assert out["f1"].item() == pytest.approx(f1_score(gold, guess))  # 2 of 3 gold, 2 of 3 predicted: 0.667
    assert out["accuracy"].item() == pytest.approx(4 / 6)


def test_binary_metrics_score_the_positive_class():
    out = classification_metrics(2)(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    assert {k: round(v.item(), 3) for k, v in out.items()} == {"accuracy": 0.75, "precision": 0.5, "recall": 1.0,
                                                               "f1": 0.667}


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,text,line,message", [
    ("sst2", "label\tsentence\n1\tgood\n0 missing tab\n", 3, "expected 2 tab-separated fields"),
    ("sst2", "label\tsentence\n1\tgood\n2\tbad label\n", 3, "label '2' is not one of 0..1"),
    ("sst2", "sentence\n1\tgood\n", 1, "header"),
    ("conll2003", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-PER\n", 4, "expected 4 space-separated"),
    ("conll2003", "EU NNP B-NP B-ORG\nrejects VBZ B-VP B-FOO\n", 2, "unknown label 'B-FOO'"),
    ("ud_pos", "# text = Hi\n1\tHi\thi\tINTJ\tUH\t_\t0\troot\t0:root\t_\n2\t!\t!\tPUNCT\n", 3,
     "expected 10 tab-separated CoNLL-U columns, found 4"),
    ("ud_pos", "1\tHi\thi\tWORD\tUH\t_\t0\troot\t0:root\t_\n", 1, "unknown label 'WORD'"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", 3,
     "expected 4 tab-separated fields, found 3"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", 2, "unknown label 'maybe'"),
    ("wnli", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t2\n", 2, "label '2' is not one of 0..1"),
    ("stsb", "sentence1\tsentence2\tscore\na\tb\t6.1\n", 2, r"score '6.1' is not a number in \[0, 5\]"),
    ("stsb", "sentence1\tsentence2\tscore\na\tb\thigh\n", 2, "score 'high' is not a number"),
    ("mrpc", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\ta\n", 1,
     "expected a header with the columns #1 String, #2 String, Quality; #2 String not in"),
    ("cola", "gj04\t1\t\tA fine sentence.\ngj04\t1\tonly three\n", 2, "expected 4 tab-separated fields, found 3"),
])
def test_malformed_lines_name_file_and_line(tmp_path, task, text, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BertpipeError, match=message) as err:
        TASKS[task].read(path)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"label\tsentence\n1\tcaf\xe9\n")
    with pytest.raises(BertpipeError, match=rf"{path}:2: invalid UTF-8"):
        TASKS["sst2"].read(path)
    with pytest.raises(BertpipeError, match="file not found"):
        TASKS["rt_polarity"].read(tmp_path / "rt-polarity")
