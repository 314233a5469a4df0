"""The pretrain stage on real Wikipedia shards, the tiny model on the CPU: DeepSpeed over 2 gloo ranks,
ZeRO-2/3, exact resume after kill -9, SIGTERM, W&B offline and metrics, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.tracking import read_metrics

BIN = Path(sys.executable).parent
FIELDS = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "lr", "grad_norm", "loss_scale", "seq_per_s",
          "tokens_per_s", "tflops", "mfu", "step_time_s", "memory_mb")


def command(shards: Path, vocab: Path, run_dir: Path, *overrides: str, ranks: int = 1) -> list[str]:
    # a fresh port for every launch: a killed run's port (and DeepSpeed's shared-memory segments named after
    # it) must not be reused by the run that resumes it
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port())] \
        if ranks > 1 else []
    return [*launcher, str(BIN / "bertpipe"), "pretrain", "--config", "recipes/pretrain/tiny-cpu.yaml",
            f"data.shards={shards}", f"data.vocab_dir={vocab}", f"run_dir={run_dir}", "data.micro_batch=16",
            "data.global_batch=32", "data.loader_workers=1", "eval_every=0", "checkpoint_every=0",
            "track.log_every=1", *overrides]


def why(proc) -> str:
    """The lines of a failed run's stderr that say what went wrong (a torchrun tail is mostly teardown)."""
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Error" in line]
    return "\n".join(lines[:15]) + "\n...\n" + proc.stderr[-1500:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step; after a resume the replayed steps' last record wins."""
    return {r["step"]: (r["loss"], r["samples_digest"]) for r in read_metrics(run_dir) if r["event"] == "train"}


@pytest.mark.slow
def test_two_ranks_zero2_loss_falls_and_exports(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "zero2"
    proc = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=100", "zero_stage=2", "optim.lr=2e-3",
                       "eval_every=50", "data.eval_shards=1", ranks=2))
    assert proc.returncode == 0, why(proc)
    train = [r for r in read_metrics(run_dir) if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 101))
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-10:]) / 10
    assert last < first - 2.0, (first, last)  # measured: 10.97 -> 8.18 (first 5 vs last 10 steps)
    start = next(r for r in read_metrics(run_dir) if r["event"] == "start")
    assert start["world_size"] == 2 and start["deepspeed"]["zero_optimization"]["stage"] == 2
    evals = [r for r in read_metrics(run_dir) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [50, 100] and evals[1]["mlm_acc"] > evals[0]["mlm_acc"] * 0.9
    for r in train:
        assert all(r[k] is not None for k in FIELDS), r
    # W&B: an offline run with the run's config; the metrics file has every field
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    (record,) = offline[0].glob("run-*.wandb")  # offline W&B keeps the config inside its binary run record
    assert b"zero_stage" in record.read_bytes() and str(run_dir).encode() in record.read_bytes()
    # the export loads in transformers and predicts like the last checkpoint's consolidated weights
    from transformers import BertForPreTraining

    hf = BertForPreTraining.from_pretrained(run_dir / "export")
    assert hf.config.vocab_size == 30_000 and hf.config.num_hidden_layers == 2
    plots = subprocess.run([str(BIN / "bertpipe"), "plot", str(run_dir)], capture_output=True, text=True)
    assert plots.returncode == 0 and (run_dir / "plots" / "loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_zero3_saves_and_loads(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "zero3"
    first = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=4", "zero_stage=3", "checkpoint_every=2",
                        "export=false", ranks=2))
    assert first.returncode == 0, why(first)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    more = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=6", "zero_stage=3", ranks=2))
    assert more.returncode == 0, why(more)
    assert "resumed from step-00000004 at step 4" in more.stderr
    assert sorted(losses(run_dir)) == list(range(1, 7))
    from transformers import BertForPreTraining

    BertForPreTraining.from_pretrained(run_dir / "export")  # consolidated from the ZeRO-3 shards


@pytest.mark.slow
def test_resume_after_kill_continues_exactly(wiki_shards, wiki_vocab, tmp_path):
    args = ("max_steps=40", "zero_stage=2", "checkpoint_every=20", "export=false", "model.dropout=0.1")
    reference = tmp_path / "uninterrupted"
    proc = run(command(wiki_shards, wiki_vocab, reference, *args, ranks=2))
    assert proc.returncode == 0, why(proc)

    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(wiki_shards, wiki_vocab, killed, *args, ranks=2), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() == "step-00000020") and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its step-20 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(killed)) < 40  # it really was cut off
    resumed = run(command(wiki_shards, wiki_vocab, killed, *args, ranks=2))
    assert resumed.returncode == 0, why(resumed)
    want, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(got[step][0] - want[step][0]) <= 1e-6, (step, got[step], want[step])
        assert got[step][1] == want[step][1]  # the loader served the same rows


@pytest.mark.slow
def test_sigterm_checkpoints_exits_preempted_and_resumes(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "sigterm"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = command(wiki_shards, wiki_vocab, run_dir, "max_steps=60", "export=false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 5 for r in read_metrics(run_dir) if r["event"] == "train"):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.split("-")[1])
    assert 5 <= stopped_at < 60 and "stopped by a signal" in err
    finish = run(cmd)
    assert finish.returncode == 0, why(finish)
    assert f"resumed from {tag}" in finish.stderr and max(losses(run_dir)) == 60


def test_bad_inputs(wiki_shards, wiki_vocab, tmp_path):
    other = tmp_path / "other-vocab"
    shutil.copytree(wiki_vocab, other)
    (other / "manifest.json").unlink()  # a vocabulary of its own (an HF directory): only the shards' hash tells
    with open(other / "vocab.txt", "a") as fh:
        fh.write("extra\n")
    proc = run(command(wiki_shards, other, tmp_path / "r1", "max_steps=2"))
    assert proc.returncode == 1 and "another vocabulary" in proc.stderr.splitlines()[-1]
    proc = run(command(wiki_shards, wiki_vocab, tmp_path / "r2", "max_steps=2", "model.max_positions=64"))
    assert proc.returncode == 1 and "beyond the model's 64 positions" in proc.stderr.splitlines()[-1]
    proc = run(command(wiki_shards, wiki_vocab, tmp_path / "r3", "max_steps=2", "optim.name=lamb"))
    assert proc.returncode == 1 and "lamb needs a GPU" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_damaged_checkpoint_and_other_world_size_are_refused(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "ckpt"
    proc = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=2", "zero_stage=1", "export=false"))
    assert proc.returncode == 0, why(proc)
    more = command(wiki_shards, wiki_vocab, run_dir, "max_steps=4", "zero_stage=1", "export=false")
    two = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=4", "zero_stage=1", "export=false", ranks=2))
    assert two.returncode != 0 and "written by 1 rank(s) with ZeRO stage 1; this run has 2" in two.stderr
    ckpt = run_dir / "checkpoints" / "step-00000002"
    victim = max((p for p in ckpt.rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    proc = run(more)
    assert proc.returncode == 1 and "truncated or incomplete" in proc.stderr.splitlines()[-1]
    victim.write_bytes(data[:-8] + bytes(8))
    proc = run(more)
    assert proc.returncode == 1 and "is corrupt" in proc.stderr.splitlines()[-1]
    assert torch.load(ckpt / "rank-00000.pt", weights_only=True)["loader"]["served"]
    assert json.loads((ckpt / "meta.json").read_text())["zero_stage"] == 1


def test_lr_warms_up_then_decays_polynomially_to_min_lr():
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig, lr_factor

    cfg = load_config(PretrainConfig, "recipes/pretrain/bert-base-128.yaml", ["optim.min_lr=6.0e-5"])
    warmup, total, floor = cfg.optim.warmup_steps, cfg.max_steps, 6.0e-5 / cfg.optim.lr
    assert lr_factor(0, cfg) == 1 / warmup and lr_factor(warmup - 1, cfg) == 1.0
    middle = (warmup + total) // 2
    expected = floor + (1 - floor) * ((total - middle) / (total - warmup)) ** cfg.optim.power
    assert cfg.optim.schedule == "poly" and lr_factor(middle, cfg) == pytest.approx(expected)
    assert lr_factor(total, cfg) == pytest.approx(floor)


@pytest.mark.slow
def test_phase_two_starts_from_phase_one_weights_with_a_fresh_schedule(wiki_shards, wiki_vocab, tmp_path):
    phase1, phase2, fresh = tmp_path / "phase1", tmp_path / "phase2", tmp_path / "fresh"
    first = run(command(wiki_shards, wiki_vocab, phase1, "max_steps=60", "optim.lr=2e-3"))
    assert first.returncode == 0, why(first)
    second = run(command(wiki_shards, wiki_vocab, phase2, "max_steps=3", f"model.init_from={phase1}",
                         "track.wandb=disabled"))
    assert second.returncode == 0, why(second)
    assert f"initialized from {phase1 / 'export'}" in second.stderr
    scratch = run(command(wiki_shards, wiki_vocab, fresh, "max_steps=3", "track.wandb=disabled", "export=false"))
    assert scratch.returncode == 0, why(scratch)
    one, two, new = losses(phase1), losses(phase2), losses(fresh)
    assert sorted(two) == [1, 2, 3]  # its own steps and schedule, not phase 1's
    lr = [r["lr"] for r in read_metrics(phase2) if r["event"] == "train"]
    assert lr[0] < lr[1]  # warming up again: a fresh optimizer and schedule
    # phase 2's first step sees phase 1's weights: near where phase 1 ended, far below a fresh model's start
    assert two[1][0] < new[1][0] - 1.0 and abs(two[1][0] - one[60][0]) < 1.0, (two[1], one[60], new[1])


def test_a_non_finite_loss_stops_the_run_naming_step_batch_and_checkpoint(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "nan"
    proc = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=10", "optim.lr=1e30", "optim.warmup_steps=1",
                       "checkpoint_every=1", "optim.weight_decay=0.0", "track.wandb=disabled"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "non-finite loss" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    step = int(errors[0].split(" at step ")[1].split()[0])
    micro_batch = r"the batch starts at shard\.\d{5}\.parquet row \d+ \(16 rows\)"  # the step's last micro-batch
    assert re.search(micro_batch, errors[0]), errors[0]
    assert errors[0].endswith(f"last good checkpoint: step-{step - 1:08d}"), errors[0]
    assert not (run_dir / "export").exists()  # no export of a broken model
