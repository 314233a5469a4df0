"""Time-to-accuracy probes: the pretraining weights of a step, fine-tuned briefly on downstream tasks.

At a probe step pretraining (rank 0) exports the weights to `RUN_DIR/probes/step-N/export` (HF format) and
writes `request.json` beside it: the step, the tokens, FLOPs and device-hours spent so far, the recipes and
overrides. `bertpipe probe RUN_DIR/probes/step-N` then fine-tunes each recipe on that export, one
`bertpipe finetune` subprocess each (so `pipeline/` never imports `recipes/`), and writes `probe.json`.

- inline (one machine): rank 0 runs it between two steps; the other ranks wait in short collective polls, so
  no collective waits longer than a few seconds however long the probe takes, and neither gloo's nor NCCL's
  timeout is ever reached.
- slurm: each probe is its own job (`slurm/probe.sbatch`), chained after the previous probe's, so training
  never stalls.

Each result is one `metrics.jsonl` line per task (event "probe") and W&B values, logged by the pretraining loop
while it runs; a probe job that finishes after pretraining has ended appends its lines itself (a lock and a
`logged` marker per probe make sure each is logged exactly once).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import write_json
from pipeline.errors import BertpipeError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROBES = "probes"
FINISHED = "pretraining-finished"  # in RUN_DIR/probes: from now on a probe job logs its own lines
POLL_SECONDS = 2.0  # how long a waiting rank's collective may wait for rank 0 at most (plus a little)


@dataclass
class ProbeArgs:
    every: int = 0  # steps between probes, and one at the end; 0 = no probes
    recipes: list[str] = field(default_factory=lambda: ["sst2"])  # recipes/finetune/<name>.yaml, or YAML paths
    # brief fine-tuning: a 4,000-sentence sample, one epoch, scored on the whole dev set
    overrides: list[str] = field(default_factory=lambda: [
        "task.max_train=4000", "task.max_len=64", "trainer.max_epochs=1", "trainer.val_check_interval=1.0",
        "trainer.checkpoint=false", "track.wandb=disabled"])
    mode: str = "inline"  # inline: rank 0 between steps, the others wait | slurm: an sbatch job per probe
    sbatch_args: list[str] = field(default_factory=list)  # slurm: e.g. ["--partition=gpu", "--gres=gpu:1"]
    keep_exports: bool = False  # keep each probe's exported weights and fine-tuned models (large for big BERTs)

    def __post_init__(self) -> None:
        if self.every < 0 or self.mode not in ("inline", "slurm"):
            raise ValueError("probe.every must be >= 0 and probe.mode inline or slurm")
        if self.every and not self.recipes:
            raise ValueError("probe.recipes is empty")


def probe_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / PROBES / f"step-{step:08d}"


def resolve_recipe(name: str) -> Path:
    """A finetune recipe: a YAML path, else `recipes/finetune/<name>.yaml` here or in the checkout."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        candidates = [path, ROOT / path]
    else:
        candidates = [Path("recipes/finetune") / f"{name}.yaml", ROOT / "recipes/finetune" / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise BertpipeError(f"probe recipe {name!r} not found (a finetune recipe name such as sst2, or a YAML path)")


def recipe_name(name: str) -> str:
    return Path(name).stem


def write_request(directory: Path, step: int, compute: dict, args: ProbeArgs) -> None:
    recipes = [str(resolve_recipe(r)) for r in args.recipes]
    write_json(directory / "request.json", {"step": step, **compute, "recipes": recipes,
                                            "overrides": list(args.overrides), "keep_exports": args.keep_exports})


def _command() -> list[str]:
    return [sys.executable, "-m", "pipeline.cli"]


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a probe's processes, without the pretraining rank's launcher variables: a fine-tuning
    run that saw RANK/WORLD_SIZE (torchrun) or a job step's SLURM_* would wait for ranks that never come."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")
           and not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    return env | {"TOKENIZERS_PARALLELISM": "false"} | extra


def run_probe(directory: str | Path) -> dict:
    """Fine-tune every requested recipe on the export in `directory`; write and return probe.json."""
    directory = Path(directory)
    try:
        request = json.loads((directory / "request.json").read_text())
    except (OSError, ValueError) as err:
        raise BertpipeError(f"{directory}: no readable request.json ({err})") from None
    export = directory / "export"
    if not (export / "config.json").is_file():
        raise BertpipeError(f"{directory}: no exported weights in {export}")
    start = time.perf_counter()
    tasks = {}
    for recipe in request["recipes"]:
        name = recipe_name(recipe)
        run_dir = directory / name
        cmd = [*_command(), "finetune", "--config", recipe, f"model.encoder={export}", f"run_dir={run_dir}",
               *request["overrides"], "--force", "--quiet"]
        with open(directory / f"{name}.log", "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
        if proc.returncode != 0:
            raise BertpipeError(f"probe {name} at step {request['step']} failed (exit {proc.returncode}); "
                                f"see {directory / f'{name}.log'}")
        results = json.loads((run_dir / "results.json").read_text())
        metric = results["main_metric"]
        tasks[name] = {"task": results["task"], "metric": metric, "value": results["metrics"][metric],
                       "metrics": results["metrics"], "examples": results["examples"],
                       "train_seconds": results["train_seconds"]}
        if not request.get("keep_exports"):
            shutil.rmtree(run_dir / "model", ignore_errors=True)
    if not request.get("keep_exports"):
        shutil.rmtree(export, ignore_errors=True)
    result = {k: v for k, v in request.items() if k not in ("recipes", "overrides", "keep_exports")}
    result |= {"tasks": tasks, "probe_seconds": round(time.perf_counter() - start, 3)}
    write_json(directory / "probe.json", result)
    _log_if_finished(directory)
    return result


def probe_lines(result: dict) -> Iterator[tuple[str, dict]]:
    """(name, metrics.jsonl fields) of each task of a probe result."""
    compute = {k: result[k] for k in ("tokens_seen", "flops", "device_hours") if k in result}
    for name, task in result["tasks"].items():
        yield name, {"recipe": name, "task": task["task"], "metric": task["metric"], "value": task["value"],
                     **compute, "probe_seconds": result["probe_seconds"]}


@contextlib.contextmanager
def _locked(probes: Path) -> Iterator[None]:
    probes.mkdir(parents=True, exist_ok=True)
    with open(probes / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log_if_finished(directory: Path) -> None:
    """A probe that ends after pretraining has finished appends its own lines to metrics.jsonl."""
    probes, run_dir = directory.parent, directory.parent.parent
    with _locked(probes):
        if not (probes / FINISHED).exists() or (directory / "logged").exists():
            return
        result = json.loads((directory / "probe.json").read_text())
        with open(run_dir / "metrics.jsonl", "a") as fh:
            for _, fields in probe_lines(result):
                fh.write(json.dumps({"event": "probe", "step": result["step"], "time": round(time.time(), 3),
                                     **fields}) + "\n")
        (directory / "logged").touch()


class ProbeLog:
    """On pretraining's rank 0: logs every finished probe not logged yet (metrics.jsonl and W&B)."""

    def __init__(self, run_dir: str | Path, tracker):
        self.probes = Path(run_dir) / PROBES
        self.tracker = tracker

    def collect(self, step: int) -> list[dict]:
        if not self.probes.is_dir():
            return []
        logged = []
        with _locked(self.probes):
            for directory in sorted(self.probes.glob("step-*")):
                if not (directory / "probe.json").exists() or (directory / "logged").exists():
                    continue
                result = json.loads((directory / "probe.json").read_text())
                for name, fields in probe_lines(result):
                    self.tracker.log(fields, result["step"], event="probe", wandb_prefix=f"probe/{name}",
                                     wandb_step=max(step, result["step"]))
                (directory / "logged").touch()
                logged.append(result)
        return logged

    def finish(self, step: int) -> None:
        """Pretraining is over: log what is done; probes still running will log themselves."""
        self.collect(step)
        with _locked(self.probes):
            (self.probes / FINISHED).touch()


def submit(directory: Path, after: str | None, sbatch_args: list[str]) -> str:
    """Submit `slurm/probe.sbatch` for the probe in `directory`; returns the job id."""
    script = ROOT / "slurm" / "probe.sbatch"
    cmd = ["sbatch", "--parsable", "--job-name=bertpipe-probe", f"--output={directory}/slurm-%j.out",
           *([f"--dependency=afterany:{after}"] if after else []), *sbatch_args, str(script)]
    env = clean_env(PROBE_DIR=str(directory), BERTPIPE_HOME=str(ROOT))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    except (OSError, subprocess.CalledProcessError) as err:
        raise BertpipeError(f"could not submit the probe job for {directory}: "
                            f"{getattr(err, 'stderr', '') or err}".strip()) from None
    return out.stdout.strip().split(";")[0]


def wait_together(work: Callable[[], None] | None, poll: Callable[[bool], bool]) -> BaseException | None:
    """Run `work` (rank 0 only; None elsewhere) in a thread while every rank agrees, every POLL_SECONDS, on
    whether it has finished (`poll(done)` is a collective returning True once any rank says done).
    Returns the exception `work` raised, if any."""
    error: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as err:  # handed back to the caller, which decides
            error.append(err)

    thread = threading.Thread(target=target, daemon=True) if work else None
    if thread:
        thread.start()
    while True:
        if thread:
            thread.join(POLL_SECONDS)
        else:
            time.sleep(POLL_SECONDS / 4)  # lets rank 0's poll find this rank waiting in the collective
        if poll(thread is not None and not thread.is_alive()):
            return error[0] if error else None


def probe_command(argv: list[str]) -> int:
    from pipeline.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="bertpipe probe",
        description="Fine-tune the weights a pretraining run exported for a probe (RUN_DIR/probes/step-N: "
                    "export/ and request.json) on each requested recipe and write probe.json there. Pretraining "
                    "runs this itself (probe.every); slurm/probe.sbatch runs it as a job.")
    parser.add_argument("directory", help="a probe directory, RUN_DIR/probes/step-NNNNNNNN")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    result = run_probe(args.directory)
    for name, fields in probe_lines(result):
        print(f"step {result['step']}\t{name}\t{fields['metric']}\t{fields['value']:.4f}")
    return 0
