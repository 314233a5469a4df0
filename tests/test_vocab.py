"""The vocab stage on real Wikipedia text: size, special ids, HF compatibility, determinism, reruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from transformers import BertTokenizerFast

from pipeline.config import load_config
from pipeline.vocab import VocabConfig, build_vocab
from tokenization import SPECIAL_TOKENS, load_tokenizer, special_ids


def config(inputs, out, **settings) -> VocabConfig:
    items = [f"corpus.inputs=[{','.join(f'{{path: {str(p)!r}}}' for p in inputs)}]", f"output_dir={out}"]
    return load_config(VocabConfig, None, items + [f"{k}={v}" for k, v in settings.items()])


@pytest.fixture(scope="module")
def wiki_30k(wiki_vocab):
    return wiki_vocab


def real_lines(wiki_files, n=1000) -> list[str]:
    lines = []
    for line in wiki_files[40].read_text().splitlines():
        if len(line) > 40 and not line.startswith("<"):
            lines.append(line)
        if len(lines) == n:
            break
    assert len(lines) == n
    return lines


def test_30k_vocabulary_has_the_exact_size_and_fixed_specials(wiki_30k):
    vocab = (wiki_30k / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 30_000
    assert vocab[:5] == list(SPECIAL_TOKENS)
    ids = special_ids(load_tokenizer(wiki_30k))
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask, ids.vocab_size) == (0, 1, 2, 3, 4, 30_000)
    assert sum(t.startswith("##") for t in vocab) > 5_000  # continuation pieces carry the ## prefix
    manifest = json.loads((wiki_30k / "manifest.json").read_text())
    assert manifest["counts"]["documents"] > 1000 and len(manifest["inputs"]) == 20
    assert all(len(i["sha256"]) == 64 and i["size"] > 0 for i in manifest["inputs"])


def test_hf_tokenizer_gives_the_same_ids_on_real_lines(wiki_30k, wiki_files):
    ours = load_tokenizer(wiki_30k)
    hf = BertTokenizerFast.from_pretrained(str(wiki_30k))
    lines = real_lines(wiki_files)
    assert hf(lines)["input_ids"] == [e.ids for e in ours.encode_batch(lines)]
    pairs = list(zip(lines[::2], lines[1::2], strict=True))
    theirs = hf([a for a, _ in pairs], [b for _, b in pairs])
    mine = ours.encode_batch(pairs)
    assert theirs["input_ids"] == [e.ids for e in mine]
    assert theirs["token_type_ids"] == [e.type_ids for e in mine]
    unk = sum(i == 1 for e in mine for i in e.ids) / sum(len(e.ids) for e in mine)
    assert unk < 0.005


def test_two_builds_are_byte_identical_and_a_rerun_is_a_no_op(wiki_files, tmp_path, caplog):
    first, second = tmp_path / "a", tmp_path / "b"
    build_vocab(config(wiki_files[:3], first, vocab_size=8000))
    build_vocab(config(wiki_files[:3], second, vocab_size=8000))
    for name in ("vocab.txt", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    stamp = (first / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        build_vocab(config(wiki_files[:3], first, vocab_size=8000))
    assert "up to date" in caplog.text
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    # changed settings or --force rebuild
    build_vocab(config(wiki_files[:3], first, vocab_size=7000))
    assert len((first / "vocab.txt").read_text().splitlines()) == 7000
    build_vocab(config(wiki_files[:3], first, vocab_size=7000), force=True)
    assert (first / "manifest.json").stat().st_mtime_ns != stamp


def test_cased_vocabulary_with_unused_slots(wiki_files, tmp_path):
    out = build_vocab(config(wiki_files[:2], tmp_path / "cased", vocab_size=6000, lowercase=False, num_unused=10))
    tok = load_tokenizer(out)
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert vocab[5:15] == [f"[unused{i}]" for i in range(10)] and len(vocab) == 6000
    ids = special_ids(tok)
    assert ids.num_unused == 10 and ids.regular_ids[0] == 15 and ids.reserved == list(range(15))
    ids = tok.encode("The United States").ids
    assert tok.decode(ids) == "The United States"  # case kept
    assert not any(5 <= i < 15 for i in tok.encode("unused tokens [unused] never appear").ids)
    hf = BertTokenizerFast.from_pretrained(str(out))
    assert hf("The United States")["input_ids"] == ids


def test_failed_build_leaves_no_output(wiki_files, tmp_path):
    bad = tmp_path / "zz-bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    out = tmp_path / "v"
    with pytest.raises(Exception, match="invalid UTF-8"):
        build_vocab(config([wiki_files[0], bad], out, vocab_size=3000))
    assert not out.exists() and not (tmp_path / "v.incomplete").exists()


def test_demo_recipe_runs_offline_through_the_console_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "demo"
    bertpipe = os.path.join(os.path.dirname(sys.executable), "bertpipe")
    proc = subprocess.run([bertpipe, "vocab", "--config", ROOT / "recipes/vocab/demo.yaml", f"output_dir={out}",
                           "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert special_ids(load_tokenizer(out)).vocab_size == 4000


def test_help_everywhere():
    bertpipe = os.path.join(os.path.dirname(sys.executable), "bertpipe")
    top = subprocess.run([bertpipe, "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "vocab" in top.stdout
    sub = subprocess.run([bertpipe, "vocab", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and "vocab_size" in sub.stdout and "--force" in sub.stdout
    bad = subprocess.run([bertpipe, "vocabulary"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
