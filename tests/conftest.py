"""Shared fixtures: the real data directory (DATA_DIR, default ../shared/data) and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.log import setup_logging

ROOT = Path(__file__).resolve().parents[1]
# nothing here may reach a hub or W&B's servers: the tests run offline
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)


def data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data() -> Path:
    path = data_dir()
    if not (path / "pretrain").is_dir():
        pytest.skip(f"real data not found at {path}: set DATA_DIR to the shared data directory")
    return path


@pytest.fixture(scope="session")
def wiki_files(data: Path) -> list[Path]:
    return sorted((data / "pretrain" / "wikipedia" / "AA").glob("wiki_*"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module that trains small networks: on a shared 2-core machine two threads
    fight over the cores and small steps slow down tenfold."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys):
    """Run `bertpipe ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        setup_logging(quiet=True)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def build_vocab_dir(files, out: Path, vocab_size: int = 30_000) -> Path:
    from pipeline.config import load_config
    from pipeline.vocab import VocabConfig, build_vocab

    inputs = ",".join(f"{{path: '{f}'}}" for f in files)
    return build_vocab(load_config(VocabConfig, None, [f"corpus.inputs=[{inputs}]", f"output_dir={out}",
                                                      f"vocab_size={vocab_size}"]))


def shard_config(files, vocab: Path, out: str, *overrides: str):
    from pipeline.config import load_config
    from pipeline.shard import ShardConfig

    inputs = ",".join(f"{{path: '{f}'}}" for f in files)
    return load_config(ShardConfig, None, [f"corpus.inputs=[{inputs}]", f"vocab_dir={vocab}", f"output_dir={out}",
                                           "workers=1", *overrides])


@pytest.fixture(scope="session")
def wiki_vocab(wiki_files, tmp_path_factory) -> Path:
    """A 30k uncased vocabulary from the first 20 Wikipedia files."""
    return build_vocab_dir(wiki_files[:20], tmp_path_factory.mktemp("vocab") / "wiki30k")


@pytest.fixture(scope="session")
def wiki_shards(wiki_files, wiki_vocab, tmp_path_factory) -> Path:
    """Seq-128 shards of 10 Wikipedia files (about 21k instances), 12 of their documents held out."""
    from pipeline.shard import build_shards

    out = tmp_path_factory.mktemp("shards") / "wiki128"
    build_shards(shard_config(wiki_files[20:30], wiki_vocab, str(out), *WIKI_SHARDS))
    return out


WIKI_SHARDS = ("rows_per_shard=4096", "eval_documents=12")  # the wiki_shards fixture's settings


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real slurmctld + slurmd on localhost for the session (skips where root or apt is missing)."""
    from slurm_cluster import Cluster, Unavailable

    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM tests must run in CI: {err}")
        pytest.skip(f"SLURM tests skipped: {err}")
    yield cluster
    cluster.stop()
