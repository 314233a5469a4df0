"""HF `datasets` in and out: a corpus saved with `datasets` (save_to_disk, Parquet) gives the very shards its
WikiExtractor files give; task splits read from datasets by column; shards open as a `datasets.Dataset`.
Every dataset here is built from the real data by `datasets` itself."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import datasets
import pytest
from conftest import shard_config

from pipeline.corpus import Corpus, CorpusConfig, CorpusInput
from pipeline.errors import BertpipeError
from pipeline.shard import build_shards
from recipes.tasks import NER_TAGS, TASKS, TaskConfig, read_splits

DOC = re.compile(r'<doc id="([^"]*)" url="[^"]*" title="([^"]*)">\n(.*?)\n</doc>', re.S)


def wikiextractor_rows(batch: dict) -> dict:
    """WikiExtractor files (one row per file) -> one row per article: id, title, text (the title line dropped)."""
    out = {"id": [], "title": [], "text": []}
    for text in batch["text"]:
        for m in DOC.finditer(text):
            title, body = html.unescape(m.group(2)), m.group(3).split("\n")
            out["id"].append(html.unescape(m.group(1)))
            out["title"].append(title)
            out["text"].append("\n".join(body[1:] if body and body[0].strip() == title.strip() else body))
    return out


@pytest.fixture(scope="module")
def wiki_dataset(wiki_files, tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """Two Wikipedia files as a `datasets` directory (save_to_disk, 3 Arrow files) and as Parquet files."""
    files = wiki_files[:2]
    root = tmp_path_factory.mktemp("hf")
    raw = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train",
                                cache_dir=str(root / "cache"))
    articles = raw.map(wikiextractor_rows, batched=True, remove_columns=["text"])
    articles.save_to_disk(str(root / "saved"), num_shards=3)
    (root / "parquet").mkdir()
    for i in range(2):
        articles.shard(2, i, contiguous=True).to_parquet(str(root / "parquet" / f"part-{i}.parquet"))
    return files, root / "saved", root / "parquet"


def test_a_saved_dataset_reads_as_the_wikiextractor_files(wiki_dataset):
    files, saved, parquet = wiki_dataset
    expected = [(d.id, d.title, d.text) for d in Corpus(CorpusConfig([CorpusInput(str(f)) for f in files])).documents()]
    assert len(expected) == 91
    for spec in (CorpusInput(str(saved), "hf", id_column="id", title_column="title"),
                 CorpusInput(str(parquet / "*.parquet"), "hf", id_column="id", title_column="title"),
                 CorpusInput(str(saved), id_column="id", title_column="title")):  # auto: a saved dataset is hf
        corpus = Corpus(CorpusConfig([spec]))
        assert {f.format for f in corpus.files()} == {"hf"}
        assert [(d.id, d.title, d.text) for d in corpus.documents()] == expected


def test_shards_from_a_dataset_are_byte_identical_to_shards_from_wikiextractor(wiki_dataset, minilm, tmp_path):
    files, saved, _ = wiki_dataset
    inputs = f"[{{path: '{saved}', format: hf, id_column: id, title_column: title}}]"
    from_files = build_shards(shard_config(files, minilm, str(tmp_path / "files"), "rows_per_shard=1000"))
    from_dataset = build_shards(shard_config(files, minilm, str(tmp_path / "hf"), "rows_per_shard=1000",
                                             f"corpus.inputs={inputs}"))
    a, b = (json.loads((Path(d) / "manifest.json").read_text()) for d in (from_files, from_dataset))
    assert len(a["shards"]) >= 2 and [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [i["format"] for i in b["inputs"]] == ["hf"] * 3  # the dataset's Arrow files, hashed as inputs

    # the shards open as a datasets.Dataset
    shards = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in Path(from_dataset).glob("shard.*")),
                                   split="train", cache_dir=str(tmp_path / "cache"))
    assert shards.num_rows == b["rows"]
    assert set(shards.column_names) >= {"input_ids", "token_type_ids", "next_sentence_label", "doc_a", "doc_b"}
    row = shards[0]
    assert row["input_ids"][0] == 101 and len(row["input_ids"]) == len(row["token_type_ids"])


def test_a_dataset_without_the_text_column_is_one_clear_error(wiki_dataset):
    _, saved, _ = wiki_dataset
    with pytest.raises(BertpipeError, match=r"no column 'body' \(it has text, id, title; set the input's"):
        list(Corpus(CorpusConfig([CorpusInput(str(saved), "hf", text_column="body")])).documents())


def test_task_splits_read_from_datasets_by_column(data, tmp_path):
    """SST-2 and CoNLL-2003 as `datasets` directories (built by datasets from the real files) read as the same
    examples as the files themselves; ClassLabel values are matched to the task's labels by name."""
    sst2 = data / "finetune" / "sst2"
    for split in ("train", "dev"):
        ds = datasets.load_dataset("csv", data_files=str(sst2 / f"{split}.tsv"), delimiter="\t", quoting=3,
                                   split="train", cache_dir=str(tmp_path / "cache"))
        ds = ds.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))
        if "content" in ds.column_names:  # the dev file's header names the text column so; train's "sentence"
            ds = ds.rename_column("content", "sentence")
        ds.save_to_disk(str(tmp_path / "sst2" / split))
    direct = read_splits(TaskConfig("sst2", train=str(sst2 / "train.tsv"), dev=str(sst2 / "dev.tsv")), TASKS["sst2"])
    from_ds = read_splits(TaskConfig("sst2", train=str(tmp_path / "sst2" / "train"), dev=str(tmp_path / "sst2" / "dev"),
                                     text_column="sentence"), TASKS["sst2"])
    assert from_ds == direct and len(from_ds["train"]) == 67_349

    conll = TaskConfig("conll2003", train=str(data / "finetune" / "conll2003" / "eng.testa"), dev="", max_eval=None)
    sentences = TASKS["conll2003"].read(conll.train)
    shuffled = sorted(NER_TAGS)  # another order of the same names: matched by name, not index
    ds = datasets.Dataset.from_dict(
        {"tokens": [s.words for s in sentences], "ner_tags": [[shuffled.index(NER_TAGS[t]) for t in s.tags]
                                                              for s in sentences]},
        features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                    "ner_tags": datasets.Sequence(datasets.ClassLabel(names=shuffled))}))
    ds.to_parquet(str(tmp_path / "conll.parquet"))
    cfg = TaskConfig("conll2003", train=str(tmp_path / "conll.parquet"), dev=str(tmp_path / "conll.parquet"),
                     tags_column="ner_tags")
    read = read_splits(cfg, TASKS["conll2003"])
    assert read["dev"] == sentences

    cfg = TaskConfig("sst2", train=str(tmp_path / "sst2" / "train"), dev=str(tmp_path / "sst2" / "dev"))
    with pytest.raises(BertpipeError, match=r"no column 'text' \(it has .*sentence.*; set task.text_column"):
        read_splits(cfg, TASKS["sst2"])
