"""Make's file dependencies: only stale stages rerun, an unchanged tree does nothing (real stages, real make)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(not (ROOT / ".venv" / ".installed-stamp").exists() or not shutil.which("make"),
                                reason="needs make and the project's .venv (make setup)")


@pytest.fixture
def pipeline(wiki_files, tmp_path):
    """A profile whose vocab and shard stages read one real Wikipedia file copied into tmp_path."""
    corpus = tmp_path / "corpus" / "wiki_00"
    corpus.parent.mkdir()
    shutil.copy(wiki_files[0], corpus)
    inputs = f"corpus:\n  inputs:\n    - {{path: {corpus}, format: wikiextractor}}\n"
    (tmp_path / "vocab.yaml").write_text(inputs + "vocab_size: 2000\nlowercase: true\n")
    (tmp_path / "shard.yaml").write_text(inputs + "max_seq_len: 64\nrows_per_shard: 4096\nworkers: 1\n")
    profile = tmp_path / "small.sh"
    profile.write_text(f"VOCAB_CONFIG={tmp_path}/vocab.yaml\nSHARD_CONFIG={tmp_path}/shard.yaml\n"
                       f"CORPUS_FILES={corpus}\nPRETRAIN_CONFIG=recipes/pretrain/tiny-cpu.yaml\n")

    def make(*args: str) -> str:
        proc = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", *args, f"PROFILE={profile}",
                               f"BUILD={tmp_path / 'build'}"], capture_output=True, text=True)
        assert proc.returncode == 0 or args[:1] == ("-q",), proc.stdout + proc.stderr
        return proc.stdout + proc.stderr if args[:1] != ("-q",) else str(proc.returncode)

    return make, tmp_path, corpus


def ran(out: str) -> set[str]:
    """The stages a make run started."""
    return {stage for stage in ("vocab", "shard") if f"bin/bertpipe {stage} " in out}


def manifest(tmp_path: Path, stage: str) -> dict:
    return json.loads((tmp_path / "build" / "small" / stage / "manifest.json").read_text())


def test_make_reruns_only_the_stale_stages_and_nothing_on_an_unchanged_tree(pipeline):
    make, tmp, corpus = pipeline
    assert ran(make("shards")) == {"vocab", "shard"}
    first = manifest(tmp, "shards")

    assert make("-q", "shards") == "0"  # up to date
    assert ran(make("shards")) == set()

    (tmp / "shard.yaml").write_text((tmp / "shard.yaml").read_text().replace("max_seq_len: 64", "max_seq_len: 96"))
    assert ran(make("shards")) == {"shard"}  # a shard setting: the vocabulary stands
    assert manifest(tmp, "shards")["config"]["max_seq_len"] == 96

    with open(corpus, "a") as fh:  # the corpus grows: vocabulary and shards are rebuilt
        fh.write('<doc id="0" url="" title="Extra">\nExtra\n\n' + "A new sentence about trains and rivers. " * 50
                 + "\n</doc>\n")
    assert ran(make("shards")) == {"vocab", "shard"}
    assert manifest(tmp, "shards")["rows"] != first["rows"]

    vocab_yaml = tmp / "vocab.yaml"
    vocab_yaml.write_text(vocab_yaml.read_text().replace("vocab_size: 2000", "vocab_size: 1500"))
    assert ran(make("shards")) == {"vocab", "shard"}  # a vocab setting: both
    assert len((tmp / "build" / "small" / "vocab" / "vocab.txt").read_text().splitlines()) == 1500

    assert ran(make("shards", "SHARD_OVERRIDES=dupe_factor=2")) == {"shard"}  # an override is a setting too
    assert make("-q", "shards", "SHARD_OVERRIDES=dupe_factor=2") == "0"
