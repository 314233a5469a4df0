"""SLURM, for real: a slurmctld and two slurmd nodes started by the tests run bertpipe's batch scripts."""

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


def preempt_and_requeue(slurm, job: str, run_dir: Path, after: int = 20) -> str:
    """USR1 once the job has trained `after` steps; let it checkpoint, requeue itself and finish; its final state.
    The time limits only bound a failure: on a crowded 2-core machine a 150-step run takes many minutes."""
    deadline = time.time() + 1200
    while time.time() < deadline and max(train_losses(run_dir), default=0) < after:
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.5)
    slurm.run("scancel", "-s", "USR1", job)
    # the job checkpoints, exits 75 and requeues itself; a requeued job waits for its begin time: start it now
    while time.time() < deadline and slurm.job(job).get("Restarts", "0") == "0":
        time.sleep(0.5)
    assert slurm.job(job)["Restarts"] == "1"
    while time.time() < deadline and slurm.job(job)["JobState"] != "PENDING":
        time.sleep(0.5)
    # slurmd revokes the first run's credential with a timestamp in whole seconds: a relaunch within the same
    # second is refused ("Job credential revoked") and the job fails without running. On a real cluster the
    # requeued job waits for its begin time (a minute or more); here it may start once that second has passed.
    time.sleep(2)
    slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
    return slurm.wait([job], timeout=1200)[job]


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
    assert preempt_and_requeue(slurm, job, run_dir) == "COMPLETED"
    log = next((work / "logs").glob(f"bertpipe-pretrain-{job}.out")).read_text()
    assert "preempted after a checkpoint: requeueing" in log and "restart count 1" in log
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert int(checkpoints[0].split("-")[1]) < 150 and checkpoints[-1] == "step-00000150"
    got, want = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == list(range(1, 151))
    assert abs(got[150] - want[150]) <= 1e-6, (got[150], want[150])
    assert os.path.exists(run_dir / "config.yaml")


def test_a_two_node_job_runs_a_rank_per_node_and_requeues_to_finish_exactly(slurm, wiki_shards, wiki_vocab, tmp_path):
    """`sbatch --nodes 2` of slurm/pretrain.sbatch: one srun task per node, gloo between them, USR1 mid-run,
    requeued, and every step's loss and rows equal to an uninterrupted two-rank run."""
    import subprocess

    two_ranks = " data.global_batch=32 zero_stage=2 max_steps=60"
    reference = tmp_path / "reference"
    overrides = pretrain_overrides(wiki_shards, wiki_vocab, reference) + two_ranks
    port = subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
                           "print(s.getsockname()[1])"], capture_output=True, text=True).stdout.strip()
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, str(BIN / "bertpipe"),
                           "pretrain", "--config", str(ROOT / "recipes/pretrain/tiny-cpu.yaml"), *overrides.split(),
                           "--quiet"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]

    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    run_dir = work / "run"
    env = {**slurm.env, "BERTPIPE_HOME": str(ROOT), "BERTPIPE": str(BIN / "bertpipe"), "GLOO_SOCKET_IFNAME": "lo",
           "CONFIG": str(ROOT / "recipes/pretrain/tiny-cpu.yaml"),
           "OVERRIDES": pretrain_overrides(wiki_shards, wiki_vocab, run_dir) + two_ranks}
    sub = subprocess.run(["sbatch", "--parsable", f"--chdir={work}", "--nodes=2", "--ntasks-per-node=1",
                          "--cpus-per-task=1", str(ROOT / "slurm/pretrain.sbatch")], capture_output=True, text=True,
                         env=env)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    log_file = work / "logs" / f"bertpipe-pretrain-{job}.out"
    assert preempt_and_requeue(slurm, job, run_dir, after=10) == "COMPLETED", log_file.read_text()[-3000:]
    log = log_file.read_text()
    assert "2 rank(s) on 2 node(s)" in log and "preempted after a checkpoint: requeueing" in log
    assert "restart count 1" in log
    start = next(r for r in read_metrics(run_dir) if r["event"] == "start")
    assert start["nodes"] == 2 and sorted(r["node"] for r in start["ranks"]) == [0, 1]
    assert [r["rank"] for r in start["ranks"]] == [0, 1]
    hosts = {r["host"] for r in start["ranks"]}
    assert hosts == {"n1", "n2"} or len(hosts) == 1  # n1/n2 where the test cluster could give each its hostname
    resume = next(r for r in read_metrics(run_dir) if r["event"] == "resume")
    assert resume["world_size"] == 2 and not resume["resharded"] and resume["step"] < 60
    got = {r["step"]: (r["loss"], r["samples_digest"]) for r in read_metrics(run_dir) if r["event"] == "train"}
    want = {r["step"]: (r["loss"], r["samples_digest"]) for r in read_metrics(reference) if r["event"] == "train"}
    assert sorted(got) == list(range(1, 61)) and got == want


def test_submit_pipeline_runs_the_demo_as_chained_jobs_that_all_complete(slurm, data, tmp_path):
    """slurm/submit_pipeline.sh on the demo profile (shorter: 60 steps, 600 examples) with pretraining on two
    nodes: every job COMPLETED, every stage's output in place, one log per job, the leaderboard ranks the five
    runs."""
    import subprocess

    build = tmp_path / "demo"
    env = {**slurm.env, "BERTPIPE": str(BIN / "bertpipe"), "DATA_DIR": str(data), "CPUS_PER_TASK": "1",
           "GLOO_SOCKET_IFNAME": "lo",
           "PRETRAIN_OVERRIDES": "max_steps=60 eval_every=0 checkpoint_every=30 track.wandb=offline "
                                 "data.micro_batch=16",
           "FINETUNE_OVERRIDES": "task.max_train=600 task.max_eval=200 task.max_len=48 trainer.max_epochs=1 "
                                 "trainer.lr=2e-4 trainer.accelerator=cpu track.wandb=disabled",
           "BASELINE_OVERRIDES": "task.max_train=600 task.max_eval=200 task.max_len=48 trainer.max_epochs=1 "
                                 "trainer.accelerator=cpu track.wandb=disabled"}
    sub = subprocess.run(["bash", str(ROOT / "slurm/submit_pipeline.sh"), "recipes/pipeline/demo.sh", "--build",
                          str(build), "--time", "01:00:00", "--nodes", "2"], capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    jobs = dict(line.split() for line in sub.stdout.splitlines())
    assert list(jobs) == ["vocab", "shard", "shard-merge", "pretrain", "finetune", "baselines", "leaderboard"]
    dependency = slurm.job(jobs["pretrain"]).get("Dependency", "")
    assert jobs["shard-merge"] in dependency or dependency == "(null)"  # (null) once the merge has finished
    states = slurm.wait(list(jobs.values()), timeout=1200)
    logs = sorted(p.name for p in (build / "logs").iterdir())
    assert states == dict.fromkeys(jobs.values(), "COMPLETED"), (states, logs, _tails(build / "logs"))
    assert (build / "vocab" / "manifest.json").is_file() and (build / "shards" / "manifest.json").is_file()
    assert (build / "pretrain" / "export" / "model.safetensors").is_file()
    assert max(train_losses(build / "pretrain")) == 60
    start = next(r for r in read_metrics(build / "pretrain") if r["event"] == "start")
    assert start["world_size"] == 2 and start["nodes"] == 2  # one rank on each node
    runs = ["sst2", "sst2-bert-scratch", "sst2-lstm", "sst2-bilstm", "sst2-gru"]
    for run in runs:
        assert (build / "runs" / run / "results.json").is_file(), run
    board = (build / "runs" / "leaderboard.md").read_text()
    assert sum(f"| {run} |" in board for run in runs) == 5, board
    assert len(logs) == 10  # vocab, the shard task, merge, pretrain, the finetune task, 4 baselines, leaderboard


def test_probes_run_as_slurm_jobs_chained_one_after_another(slurm, wiki_shards, wiki_vocab, tmp_path):
    """probe.mode=slurm: pretraining submits slurm/probe.sbatch per probe step, each after the one before, and
    goes on; the jobs finish after it and log their own lines, once each."""
    import subprocess

    run_dir = tmp_path / "run"
    probe = ["probe.every=2", "probe.mode=slurm", "probe.sbatch_args=[--cpus-per-task=1]",
             "probe.overrides=[task.max_train=100,task.max_eval=100,task.max_len=32,trainer.max_epochs=1,"
             "trainer.checkpoint=false,track.wandb=disabled,trainer.accelerator=cpu]"]
    cmd = [str(BIN / "bertpipe"), "pretrain", "--config", str(ROOT / "recipes/pretrain/tiny-cpu.yaml"),
           *pretrain_overrides(wiki_shards, wiki_vocab, run_dir).replace("max_steps=150", "max_steps=4").split(),
           *probe]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=slurm.env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [line.rsplit(" ", 1)[1] for line in proc.stderr.splitlines() if ": SLURM job " in line]
    assert len(jobs) == 2, proc.stderr[-2000:]
    dependency = slurm.job(jobs[1]).get("Dependency", "")
    assert f"afterany:{jobs[0]}" in dependency or dependency == "(null)"  # (null) once the first has finished
    states = slurm.wait(jobs, timeout=900)
    probes = run_dir / "probes"
    assert states == dict.fromkeys(jobs, "COMPLETED"), _tails(probes / "step-00000002")
    lines = [r for r in read_metrics(run_dir) if r["event"] == "probe"]
    assert sorted(r["step"] for r in lines) == [2, 4] and all(r["recipe"] == "sst2" for r in lines)
    assert (probes / "step-00000004" / "probe.json").is_file() and (probes / "step-00000004" / "logged").exists()


def _tails(logs: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-800:]}" for p in sorted(logs.iterdir()))


def test_submit_pipeline_dry_run_asks_for_the_cluster_it_is_given(tmp_path):
    """The GPU and accounting parameters reach the sbatch lines (the live test above runs on CPUs only)."""
    import subprocess

    env = {**os.environ, "DATA_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "slurm/submit_pipeline.sh"), "--config", "recipes/pipeline/demo.sh",
                           "--dry-run", "--partition", "gpu", "--account", "proj", "--nodes", "2", "--gpus-per-node",
                           "8", "--time", "12:00:00", "--build", str(tmp_path / "b")], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("--job-name=bertpipe-")[1].split()[0]: line for line in proc.stderr.splitlines()}
    assert list(lines) == ["vocab", "shard", "shard-merge", "pretrain", "finetune", "baselines", "leaderboard"]
    assert all("--partition=gpu" in line and "--account=proj" in line for line in lines.values())
    pretrain = lines["pretrain"]
    assert "--nodes=2 --ntasks-per-node=8 --gres=gpu:8" in pretrain and "--time=12:00:00" in pretrain
    assert "--dependency=afterok:<shard-merge>" in pretrain and "--gres=gpu:1" in lines["finetune"]
    assert "--dependency=afterok:<vocab>" in lines["baselines"] and "--array=0-3" in lines["baselines"]
    assert "task.name=word_order" in lines["finetune"]  # no SST-2 in this DATA_DIR: the offline task
    assert "--dependency=afterok:<finetune>:<baselines>" in lines["leaderboard"]
    bad = subprocess.run(["bash", str(ROOT / "slurm/submit_pipeline.sh"), "--nodes"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "submit_pipeline.sh: --nodes needs a value (see --help)"


def test_submit_pipeline_dry_run_chains_glue_after_pretraining(tmp_path):
    """--glue: an array of one (task, seed) run per task, after pretraining, then the table; the leaderboard
    waits for it too."""
    import subprocess

    env = {**os.environ, "DATA_DIR": str(tmp_path), "BERTPIPE": str(BIN / "bertpipe"), "GLUE_TASKS": "rte,mrpc",
           "GLUE_SEEDS": "2,rte=3"}
    proc = subprocess.run(["bash", str(ROOT / "slurm/submit_pipeline.sh"), "recipes/pipeline/demo.sh", "--dry-run",
                           "--glue", "--build", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("--job-name=bertpipe-")[1].split()[0]: line for line in proc.stderr.splitlines()}
    assert list(lines)[-3:] == ["glue", "glue-table", "leaderboard"]
    assert "--dependency=afterok:<pretrain>" in lines["glue"] and "--array=0-4" in lines["glue"]  # 2 + 3 runs
    assert f"--encoder {tmp_path / 'b' / 'pretrain'} --out {tmp_path / 'b' / 'runs' / 'glue-bert'}" in lines["glue"]
    assert "--dependency=afterok:<glue>" in lines["glue-table"] and "--array" not in lines["glue-table"]
    assert "--dependency=afterok:<finetune>:<baselines>:<glue-table>" in lines["leaderboard"]


def test_glue_array_runs_one_task_and_seed_each_then_writes_the_table(slurm, data, wiki_vocab, tmp_path):
    """slurm/glue.sbatch: an array task per (task, seed) of `bertpipe glue --list` (RTE and WNLI, two seeds of
    RTE, a few steps each), then the same script without an array writes the table from the finished runs."""
    import json
    import subprocess

    out = tmp_path / "glue"
    glue_args = (f"--recipes {ROOT}/recipes/baselines/glue-{{task}}-bilstm.yaml --vocab {wiki_vocab} --out {out} "
                 "--tasks rte,wnli --seeds 1,rte=2")
    env = {**slurm.env, "BERTPIPE_HOME": str(ROOT), "BERTPIPE": str(BIN / "bertpipe"), "DATA_DIR": str(data),
           "GLUE_ARGS": glue_args,
           "OVERRIDES": "task.max_train=64 task.max_eval=32 trainer.max_steps=2 trainer.checkpoint=false "
                        "trainer.accelerator=cpu track.wandb=disabled model.rnn.hidden=32 model.rnn.embed_dim=16"}
    (tmp_path / "logs").mkdir()
    listed = subprocess.run([str(BIN / "bertpipe"), "glue", *glue_args.split(), "--list"], capture_output=True,
                            text=True, env=env)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3, listed.stderr
    sbatch = ["sbatch", "--parsable", f"--chdir={tmp_path}", "--cpus-per-task=1", str(ROOT / "slurm/glue.sbatch")]
    array = subprocess.run([*sbatch[:-1], "--array=0-2", sbatch[-1]], capture_output=True, text=True, env=env)
    assert array.returncode == 0, array.stderr
    array_id = array.stdout.strip().split(";")[0]
    table = subprocess.run([*sbatch[:-1], f"--dependency=afterok:{array_id}", sbatch[-1]], capture_output=True,
                           text=True, env=env)
    table_id = table.stdout.strip().split(";")[0]
    states = slurm.wait([array_id, table_id], timeout=600)
    assert states == {array_id: "COMPLETED", table_id: "COMPLETED"}, (states, _tails(tmp_path / "logs"))
    summary = json.loads((out / "results.json").read_text())
    assert {t: e["n"] for t, e in summary["tasks"].items()} == {"rte": 2, "wnli": 1}
    assert (out / "glue.md").read_text().startswith("| model | run | RTE (accuracy) | WNLI (accuracy) |")
    assert len(list((tmp_path / "logs").glob("bertpipe-glue-*.out"))) == 4  # three array tasks and the table
