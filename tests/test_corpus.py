"""Corpus readers on the real Wikipedia sample and books: documents, titles, stripping, codecs, bad input."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil

import fsspec
import pytest
import zstandard

from pipeline.corpus import Corpus, CorpusConfig, CorpusError, CorpusInput


def read(*inputs: tuple[str, str], errors: str = "strict") -> list:
    cfg = CorpusConfig(inputs=[CorpusInput(path=str(p), format=f) for p, f in inputs], encoding_errors=errors)
    return list(Corpus(cfg).documents())


def test_wikiextractor_documents_and_titles(wiki_files):
    docs = read((wiki_files[0], "wikiextractor"))
    assert len(docs) == 38
    assert [d.title for d in docs[:3]] == ["Anarchism", "Autism", "Albedo"]
    assert [d.id for d in docs[:3]] == ["12", "25", "39"]
    # the title line is metadata: the text starts with the first paragraph, and no markup leaks through
    assert docs[0].text.startswith("Anarchism is a political philosophy")
    assert all("<doc" not in d.text and "</doc>" not in d.text for d in docs)


def test_auto_format_detects_wikiextractor(wiki_files):
    assert read((wiki_files[1], "auto")) == read((wiki_files[1], "wikiextractor"))


def test_jsonl_gives_the_same_documents(wiki_files, tmp_path):
    docs = read((wiki_files[0], "wikiextractor"))
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    again = read((path, "auto"))
    assert [(d.id, d.title, d.text) for d in again] == [(d.id, d.title, d.text) for d in docs]


def test_gutenberg_header_and_footer_are_stripped(data):
    books = data / "pretrain" / "books"
    raw = (books / "austen-pride-1342.txt").read_text(encoding="utf-8-sig")
    assert "PROJECT GUTENBERG" in raw
    (pride,) = read((books / "austen-pride-1342.txt", "book"))
    assert "Project Gutenberg" not in pride.text and "PROJECT GUTENBERG" not in pride.text
    assert "It is a truth universally acknowledged" in pride.text
    assert pride.text.rstrip().endswith("the means of uniting them.")
    # a footer without a header: the footer goes, the text stays
    (ball,) = read((books / "chesterton-ball.txt", "book"), errors="replace")
    assert "Gutenberg" not in ball.text
    assert ball.text.startswith("[The Ball and The Cross by G.K. Chesterton 1909]")
    # a book without Gutenberg markers is kept whole; wrapped lines become one paragraph
    (emma,) = read((books / "austen-emma.txt", "book"))
    assert emma.text.startswith("[Emma by Jane Austen 1816]\nVOLUME I\nCHAPTER I\nEmma Woodhouse, handsome, clever,")
    assert "\n" not in emma.text.split("\n")[3][:200]


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("First doc, line one.\nLine two.\n\n\nSecond doc.\n\nThird\n")
    docs = read((path, "plain"))
    assert [d.text for d in docs] == ["First doc, line one.\nLine two.", "Second doc.", "Third"]
    assert [d.id for d in docs] == ["plain.txt:0", "plain.txt:1", "plain.txt:2"]


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open),
                                           (".zst", lambda p, m: zstandard.open(p, m))])
def test_compressed_inputs_give_the_same_documents(wiki_files, tmp_path, suffix, opener):
    target = tmp_path / (wiki_files[2].name + suffix)
    with open(wiki_files[2], "rb") as src, opener(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert read((target, "wikiextractor")) == _strip_source(read((wiki_files[2], "wikiextractor")), target)


def _strip_source(docs, new_source):
    return [type(d)(d.id, str(new_source), d.title, d.text) for d in docs]


def test_memory_filesystem_and_globs(wiki_files):
    fs = fsspec.filesystem("memory")
    for f in wiki_files[:3]:
        fs.pipe(f"/corpus/{f.name}", f.read_bytes())
    remote = read(("memory://corpus/wiki_*", "wikiextractor"))
    local = [d for f in wiki_files[:3] for d in read((f, "wikiextractor"))]
    assert [(d.id, d.title, d.text) for d in remote] == [(d.id, d.title, d.text) for d in local]
    assert remote[0].source.startswith("memory://") and remote[0].source.endswith(f"corpus/{wiki_files[0].name}")
    fs.rm("/corpus", recursive=True)


def test_order_is_deterministic_and_sorted(wiki_files, tmp_path):
    for f in reversed(wiki_files[:4]):
        shutil.copy(f, tmp_path / f.name)
    files = Corpus(CorpusConfig(inputs=[CorpusInput(path=str(tmp_path))])).files()
    assert [f.path.rsplit("/", 1)[-1] for f in files] == [f.name for f in wiki_files[:4]]


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nsecond caf\xe9 line\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: invalid UTF-8 at byte offset 20\b"):
        read((path, "plain"))
    corpus = Corpus(CorpusConfig(inputs=[CorpusInput(path=str(path), format="plain")], encoding_errors="replace"))
    (doc,) = list(corpus.documents())
    assert doc.text == "good line\nsecond caf\ufffd line" and corpus.replaced_chars == 1


def test_real_latin1_bytes_in_a_book_are_reported(data):
    with pytest.raises(CorpusError, match=r"chesterton-ball\.txt: invalid UTF-8 at byte offset \d+"):
        read((data / "pretrain" / "books" / "chesterton-ball.txt", "book"))


@pytest.mark.parametrize("case,message", [
    ("binary", "is a binary file"),
    ("empty", "corpus is empty"),
    ("glob", "glob matches no files"),
    ("missing", "does not exist"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, cli, case, message):
    if case == "binary":
        path = tmp_path / "model.bin"
        path.write_bytes(bytes(range(256)) * 10)
    elif case == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("\n\n   \n")
    elif case == "glob":
        path = tmp_path / "nothing-*.txt"
    else:
        path = tmp_path / "missing.txt"
    code, out, err = cli("vocab", f"corpus.inputs=[{{path: '{path}'}}]", f"output_dir={tmp_path / 'out'}", "--quiet")
    assert code == 1
    assert message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()
