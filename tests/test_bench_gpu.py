"""`make bench-gpu` is meant to run once on a lent GPU: every code path it has is run here on the CPU first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1800)


def test_without_a_gpu_it_says_so_and_exits_0():
    proc = bench()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no GPU") and proc.stdout.count("\n") == 1


@pytest.mark.slow
def test_the_whole_script_runs_on_the_cpu_and_writes_one_json(data, tmp_path):
    out = tmp_path / "bench.json"
    proc = bench("--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["preset"], r["seq"]) for r in report["model"]] == [("tiny", 64), ("tiny", 128)]
    for row in report["model"]:
        assert row["bertpipe"]["seq_per_s"] > 0 and row["transformers"]["seq_per_s"] > 0
    assert [(r["preset"], r["zero"]) for r in report["loop"]] == [("tiny", 1), ("tiny", 2)]
    for row in report["loop"]:  # the whole pretrain loop under ZeRO-1 and -2, measured from its own metrics
        assert row["seq_per_s"] > 0 and row["overhead"] is not None and row["mfu_median"] > 0
    assert "pretrain loop" in proc.stdout and "overhead" in proc.stdout
