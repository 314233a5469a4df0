"""SLURM, for real: a slurmctld and slurmd started by the tests run bertpipe's batch scripts."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.tracking import read_metrics

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def pretrain_overrides(shards: Path, vocab: Path, run_dir: Path) -> str:
    return (f"data.shards={shards} data.vocab_dir={vocab} run_dir={run_dir} data.micro_batch=16 "
            "data.global_batch=16 eval_every=0 checkpoint_every=0 export=false track.log_every=1 max_steps=150 "
            "track.wandb=disabled")


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"}


def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(slurm, wiki_shards, wiki_vocab, tmp_path):
    import subprocess

    reference = tmp_path / "reference"
    overrides = pretrain_overrides(wiki_shards, wiki_vocab, reference)
    proc = subprocess.run([str(BIN / "bertpipe"), "pretrain", "--config", str(ROOT / "recipes/pretrain/tiny-cpu.yaml"),
                           *overrides.split(), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    run_dir = work / "run"
    env = {**slurm.env, "BERTPIPE_HOME": str(ROOT), "BERTPIPE": str(BIN / "bertpipe"),
           "CONFIG": str(ROOT / "recipes/pretrain/tiny-cpu.yaml"),
           "OVERRIDES": pretrain_overrides(wiki_shards, wiki_vocab, run_dir)}
    sub = subprocess.run(["sbatch", "--parsable", f"--chdir={work}", "--cpus-per-task=2",
                          str(ROOT / "slurm/pretrain.sbatch")], capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while time.time() < deadline and max(train_losses(run_dir), default=0) < 20:
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.5)
    slurm.run("scancel", "-s", "USR1", job)
    # the job checkpoints, exits 75 and requeues itself; a requeued job waits for its begin time: start it now
    while time.time() < deadline and slurm.job(job).get("Restarts", "0") == "0":
        time.sleep(0.5)
    assert slurm.job(job)["Restarts"] == "1"
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
    assert slurm.wait([job], timeout=600)[job] == "COMPLETED"
    log = next((work / "logs").glob(f"bertpipe-pretrain-{job}.out")).read_text()
    assert "preempted after a checkpoint: requeueing" in log and "restart count 1" in log
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert int(checkpoints[0].split("-")[1]) < 150 and checkpoints[-1] == "step-00000150"
    got, want = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == list(range(1, 151))
    assert abs(got[150] - want[150]) <= 1e-6, (got[150], want[150])
    assert os.path.exists(run_dir / "config.yaml")
