"""Small helpers the benchmarks share: data paths, running one measurement in a child process."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    path = Path(os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (path / "pretrain").is_dir():
        sys.exit(f"benchmark data not found at {path}: set DATA_DIR")
    return path


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, *args: str) -> dict:
    """Run `script --child ARGS` in a fresh interpreter (so peak RSS is its own) and parse its JSON line."""
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def ensure_wiki_vocab() -> Path:
    """build/vocab/wiki (the 30k recipe), built once if missing."""
    out = ROOT / "build" / "vocab" / "wiki"
    if not (out / "vocab.txt").exists():
        from pipeline.cli import main as bertpipe

        bertpipe(["vocab", "--config", str(ROOT / "recipes/vocab/wiki.yaml"), f"output_dir={out}", "--quiet"])
    return out


def ensure_wiki_shards() -> Path:
    """build/shards/wiki-128 (the phase-1 recipe), built once if missing."""
    vocab = ensure_wiki_vocab()
    out = ROOT / "build" / "shards" / "wiki-128"
    if not (out / "manifest.json").exists():
        from pipeline.cli import main as bertpipe

        bertpipe(["shard", "--config", str(ROOT / "recipes/shard/wiki-128.yaml"), f"vocab_dir={vocab}",
                  f"output_dir={out}", "--quiet"])
    return out
