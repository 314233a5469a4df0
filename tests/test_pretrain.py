"""The pretrain stage on real Wikipedia shards, the tiny model on the CPU: DeepSpeed over 2 gloo ranks,
ZeRO-2/3, exact resume after kill -9, SIGTERM, W&B offline and metrics, bad input (other world sizes and
nodes: test_world_size.py)."""

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


# a probe as brief as a test can afford: 200 SST-2 sentences, scored on the first 200 dev sentences
PROBE = ("probe.every=100", "probe.overrides=[task.max_train=200,task.max_eval=200,task.max_len=32,"
         "trainer.max_epochs=1,trainer.checkpoint=false,track.wandb=disabled,trainer.accelerator=cpu]")


@pytest.mark.slow
def test_two_ranks_zero2_loss_falls_evaluates_held_out_probes_and_exports(wiki_shards, wiki_vocab, tmp_path):
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig, lr_factor

    run_dir = tmp_path / "zero2"
    proc = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=100", "zero_stage=2", "optim.lr=2e-3",
                       "eval_every=50", "eval_batches=0", *PROBE, ranks=2))
    assert proc.returncode == 0, why(proc)
    train = [r for r in read_metrics(run_dir) if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 101))
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-10:]) / 10
    assert last < first - 2.0, (first, last)  # measured: 10.97 -> 8.18 (first 5 vs last 10 steps)
    # the logged lr is the one the step used: the schedule's value for the step before the update
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    for r in train:
        assert r["lr"] == pytest.approx(2e-3 * lr_factor(r["step"] - 1, cfg), rel=1e-9), r["step"]
    start = next(r for r in read_metrics(run_dir) if r["event"] == "start")
    assert start["world_size"] == 2 and start["deepspeed"]["zero_optimization"]["stage"] == 2
    # held out: the shard stage's eval split, all of it (eval_batches=0), shared by both ranks
    held = json.loads((wiki_shards / "manifest.json").read_text())["eval"]
    evals = [r for r in read_metrics(run_dir) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [50, 100] and evals[1]["mlm_acc"] > evals[0]["mlm_acc"] * 0.9
    assert all(r["sequences"] == held["rows"] and r["tokens_seen"] > 0 for r in evals), evals
    for r in train:
        assert all(r[k] is not None for k in FIELDS), r
    # a probe at the end: the weights fine-tuned on SST-2 (rank 0 while rank 1 waited), one line per task
    (probe,) = [r for r in read_metrics(run_dir) if r["event"] == "probe"]
    assert probe["step"] == 100 and probe["recipe"] == "sst2" and probe["metric"] == "accuracy"
    assert 0.3 < probe["value"] < 1 and probe["flops"] > 0 and probe["device_hours"] > 0
    assert probe["tokens_seen"] == train[-1]["tokens_seen"] > 100 * 32 * 20
    result = json.loads((run_dir / "probes" / "step-00000100" / "probe.json").read_text())
    assert result["tasks"]["sst2"]["examples"]["train"] == 200
    assert not (run_dir / "probes" / "step-00000100" / "export").exists()  # the probe's weights are removed
    # W&B: an offline run with the run's config; the metrics file has every field
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    (record,) = offline[0].glob("run-*.wandb")  # offline W&B keeps the config inside its binary run record
    assert b"zero_stage" in record.read_bytes() and str(run_dir).encode() in record.read_bytes()
    assert b"probe/sst2" in record.read_bytes()
    # the export loads in transformers and predicts like the last checkpoint's consolidated weights
    from transformers import BertForPreTraining

    hf = BertForPreTraining.from_pretrained(run_dir / "export")
    assert hf.config.vocab_size == 30_000 and hf.config.num_hidden_layers == 2
    plots = subprocess.run([str(BIN / "bertpipe"), "plot", str(run_dir)], capture_output=True, text=True)
    assert plots.returncode == 0 and (run_dir / "plots" / "loss.png").stat().st_size > 10_000
    assert (run_dir / "plots" / "probe.png").stat().st_size > 10_000


@pytest.mark.slow
def test_zero3_saves_loads_and_evaluates_uneven_shares_on_every_rank(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "zero3"
    # the held-out rows split unevenly over the two ranks, and so do their micro-batches: rank 0 has one more
    # (ZeRO-3 gathers parameters collectively in every forward pass: unequal passes would hang)
    rows = json.loads((wiki_shards / "manifest.json").read_text())["eval"]["rows"]
    micro = next(m for m in (16, 8, 4, 2, 1) if (rows // 2) % m == 0)
    assert rows % 2 == 1, "the test needs an odd number of held-out rows: change the fixture's eval_documents"
    evals = ("eval_every=2", "eval_batches=0", f"data.micro_batch={micro}", f"data.global_batch={2 * micro}")
    first = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=4", "zero_stage=3", "checkpoint_every=2",
                        "export=false", *evals, ranks=2))
    assert first.returncode == 0, why(first)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    more = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=6", "zero_stage=3", *evals, ranks=2))
    assert more.returncode == 0, why(more)
    assert "resumed from step-00000004 at step 4" in more.stderr
    assert sorted(losses(run_dir)) == list(range(1, 7))
    scores = [r for r in read_metrics(run_dir) if r["event"] == "eval"]
    assert [r["step"] for r in scores] == [2, 4, 6] and all(r["sequences"] == rows for r in scores)
    assert scores[-1]["batches"] == -(-(rows - rows // 2) // micro) > (rows // 2) // micro
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
    """SIGTERM to the whole process group, loader workers included, as SLURM signals every process of a job."""
    run_dir = tmp_path / "sigterm"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = command(wiki_shards, wiki_vocab, run_dir, "max_steps=60", "export=false", "data.loader_workers=2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 5 for r in read_metrics(run_dir) if r["event"] == "train"):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in err, err[-2000:]
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
def test_damaged_checkpoint_is_refused(wiki_shards, wiki_vocab, tmp_path):
    run_dir = tmp_path / "ckpt"
    proc = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=2", "zero_stage=1", "export=false"))
    assert proc.returncode == 0, why(proc)
    more = command(wiki_shards, wiki_vocab, run_dir, "max_steps=4", "zero_stage=1", "export=false")
    ckpt = run_dir / "checkpoints" / "step-00000002"
    victim = max((p for p in ckpt.rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    proc = run(more)
    assert proc.returncode == 1 and "truncated or incomplete" in proc.stderr.splitlines()[-1]
    victim.write_bytes(data[:-8] + bytes(8))
    proc = run(more)
    assert proc.returncode == 1 and "is corrupt" in proc.stderr.splitlines()[-1]
    assert torch.load(ckpt / "rank-00000.pt", weights_only=True)["loader"]["position"] == 2 * 32
    assert json.loads((ckpt / "meta.json").read_text())["zero_stage"] == 1


def test_lr_warms_up_then_decays_polynomially_to_min_lr():
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig, lr_factor

    cfg = load_config(PretrainConfig, None, ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=100",
                                            "optim.schedule=poly", "optim.power=0.5", "max_steps=1000"])
    warmup, total, floor = 100, 1000, 0.1
    assert lr_factor(0, cfg) == 1 / warmup and lr_factor(warmup - 1, cfg) == 1.0
    middle = (warmup + total) // 2
    expected = floor + (1 - floor) * ((total - middle) / (total - warmup)) ** 0.5
    assert lr_factor(middle, cfg) == pytest.approx(expected)
    assert lr_factor(total, cfg) == pytest.approx(floor)


def test_published_recipes_reproduce_their_schedules():
    """NVIDIA's PolyWarmUpScheduler, google-research/bert's optimization.py and Izsak et al.'s time-based
    schedule, written out independently of lr_factor."""
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig, lr_factor

    def recipe(name: str) -> PretrainConfig:
        return load_config(PretrainConfig, f"recipes/pretrain/{name}.yaml")

    def nvidia(step: int, warmup: float, total: int) -> float:  # schedulers.py, last_epoch = step + 1
        progress = (step + 1) / total
        return progress / warmup if progress < warmup else (1.0 - progress) ** 0.5

    for name, lr, batch, warmup, steps, seq in (("bert-large-128", 6e-3, 65536, 0.2843, 7038, 128),
                                               ("bert-large-512", 4e-3, 32768, 0.128, 1563, 512),
                                               ("bert-base-128", 6e-3, 65536, 0.2843, 7038, 128)):
        cfg = recipe(name)
        assert (cfg.optim.name, cfg.optim.lr, cfg.data.global_batch, cfg.max_steps) == ("lamb", lr, batch, steps)
        assert cfg.data.masking.max_predictions == seq * 5 // 32 and cfg.zero_stage == 0
        for step in (s for s in (0, 1, 199, 200, 201, 1000, 1999, 2000, 2001, 5000, steps - 1) if s < steps):
            assert lr_factor(step, cfg) == pytest.approx(nvidia(step, warmup, steps), abs=1e-12), (name, step)

    def google(step: int) -> float:  # optimization.py: warmup from 0, polynomial_decay(power 1) over 1M steps
        return step / 10_000 if step < 10_000 else 1.0 - step / 1_000_000

    one, two = recipe("bert-base-paper-128"), recipe("bert-base-paper-512")
    assert one.max_steps + two.max_steps == 1_000_000 and one.data.global_batch == two.data.global_batch == 256
    assert (one.optim.name, one.optim.lr, two.optim.lr) == ("adamw", 1e-4, 1e-4)
    for step in (0, 5000, 9999, 10_000, 500_000, 899_999):
        assert lr_factor(step, one) == pytest.approx(google(step), abs=1e-12)
    for step in (0, 50_000, 99_999):  # phase 2 continues phase 1's schedule
        assert lr_factor(step, two) == pytest.approx(google(900_000 + step), abs=1e-12)

    day = recipe("bert-large-24h")
    assert (day.optim.lr, day.optim.betas, day.data.global_batch, day.model.nsp) == (1e-3, [0.9, 0.98], 4096, False)
    for hours, expected in ((0.0, 0.0), (0.72, 0.5), (1.44, 1.0), (12.72, 0.5), (24.0, 0.0)):
        assert lr_factor(123, day, hours) == pytest.approx(expected, abs=1e-12), hours


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


@pytest.mark.slow
def test_zero0_bf16_exports_the_fp32_master_weights(wiki_shards, wiki_vocab, tmp_path):
    """ZeRO stage 0 under bf16/fp16 (NVIDIA's LAMB recipes): zero_to_fp32 has nothing to read, the masters are
    the optimizer's; the export holds them, not the bf16 copies the model computes with."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "bf16"
    proc = run(command(wiki_shards, wiki_vocab, run_dir, "max_steps=2", "zero_stage=0", "precision=bf16",
                       "track.wandb=disabled"))
    assert proc.returncode == 0, why(proc)
    weights = load_file(run_dir / "export" / "model.safetensors")
    query = weights["bert.encoder.layer.0.attention.self.query.weight"]
    assert query.dtype == torch.float32 and (query - query.bfloat16().float()).abs().max() > 0
