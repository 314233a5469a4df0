"""Shared fixtures: the real data directory (DATA_DIR, default ../shared/data) and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.log import setup_logging

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def cli(capsys):
    """Run `bertpipe ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        setup_logging(quiet=True)
        out, err = capsys.readouterr()
        return code, out, err

    return run
