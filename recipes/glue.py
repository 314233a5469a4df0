"""`bertpipe glue`: one encoder fine-tuned on every GLUE task over several seeds, summed up in one table.

Each (task, seed) is an ordinary `bertpipe finetune` run of the task's recipe (`recipes/finetune/glue-<task>.yaml`,
or any template such as `recipes/baselines/glue-{task}-bilstm.yaml`), written to `OUT/<task>/seed-<n>/` with
`trainer.seed=n`; the data (and any `task.max_train` sample) is the same for every seed, so the spread is the
fine-tuning's own. Small tasks are noisy, so they get more seeds: 5 for RTE, MRPC, STS-B and CoLA, 3 for the
others (MosaicBERT's convention; `--seeds`). A task's figure is the median over its seeds of its main metric
(GLUE's: CoLA Matthews correlation, MRPC the mean of F1 and accuracy, STS-B the mean of Pearson and Spearman,
accuracy otherwise), the spread is min-max; the GLUE average is the mean of those medians over the tasks run,
as GLUE averages its tasks, and also given without WNLI, as BERT reports it.

A rerun skips every run already finished with the same settings and stops at one made with other settings
(`--force` replaces those), so an interrupted `bertpipe glue` resumes and a SLURM array (`--job I`, one run per
array task; `--table` afterwards) repeats nothing. `OUT/results.json` keeps every seed's metrics; `glue.md`,
`glue.csv` and `glue.png` hold the table; the leaderboard reads results.json and sets several encoders side by
side.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.artifacts import claim, mark, os_reason, write_json
from pipeline.config import load_config, to_dict
from pipeline.errors import BertpipeError
from recipes.base import FinetuneConfig, fit
from recipes.tasks import GLUE_TASKS, TASKS

log = logging.getLogger(__name__)

DEFAULT_SEEDS = 3
MORE_SEEDS = {"rte": 5, "mrpc": 5, "stsb": 5, "cola": 5}  # the small, noisy tasks (MosaicBERT's convention)
RECIPES = "recipes/finetune/glue-{task}.yaml"
NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "wnli": "WNLI"}
METRIC_NAMES = {"mcc": "MCC", "accuracy": "accuracy", "accuracy_f1": "F1/acc", "pearson_spearman": "Pearson/Spearman"}
STAGE = "glue"
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST)  # rename onto a directory another array task has filled
WITHOUT = "wnli"  # BERT's GLUE average leaves WNLI out (its dev set is adversarial to its training set)


@dataclass(frozen=True)
class Job:
    task: str
    seed: int
    recipe: Path
    run_dir: Path


def parse_tasks(text: str | None) -> list[str]:
    tasks = [t.strip().lower().replace("-", "") for t in text.split(",") if t.strip()] if text else list(GLUE_TASKS)
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown or not tasks:
        raise BertpipeError(f"--tasks: {', '.join(unknown) or 'none given'}: choose from {', '.join(GLUE_TASKS)}")
    return [t for t in GLUE_TASKS if t in tasks]  # GLUE's order, each once


def parse_seeds(text: str | None, tasks: list[str]) -> dict[str, int]:
    """Seeds per task: the convention, then `N` (every task) and `TASK=N` entries, e.g. `3,rte=5`."""
    counts = {t: MORE_SEEDS.get(t, DEFAULT_SEEDS) for t in tasks}
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    for part in sorted(parts, key=lambda p: "=" in p):  # a bare N first, so TASK=N entries win
        name, _, value = part.rpartition("=")
        if not value.isdigit() or int(value) < 1 or (name and name not in counts):
            raise BertpipeError(f"--seeds: {part!r} is not N or TASK=N (N >= 1, TASK one of {', '.join(tasks)})")
        counts.update({name: int(value)} if name else dict.fromkeys(counts, int(value)))
    return counts


def plan(tasks: list[str], seeds: dict[str, int], template: str, out: Path) -> list[Job]:
    """Every (task, seed) run, in GLUE's task order, seeds 1..n."""
    jobs = []
    for task in tasks:
        recipe = Path(template.format(task=task))
        if not recipe.is_file():
            raise BertpipeError(f"recipe {recipe} not found (--recipes {template})")
        jobs += [Job(task, seed, recipe, out / task / f"seed-{seed}") for seed in range(1, seeds[task] + 1)]
    return jobs


def split_overrides(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`key=value` for every run, `TASK:key=value` for one task's runs only."""
    common: list[str] = []
    per_task: dict[str, list[str]] = {}
    for arg in args:
        head, sep, rest = arg.partition(":")
        if sep and "=" not in head and head.lower() in GLUE_TASKS:
            per_task.setdefault(head.lower(), []).append(rest)
        else:
            common.append(arg)
    return common, per_task


def job_config(job: Job, overrides: list[str]) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, job.recipe, [*overrides, f"run_dir={job.run_dir}", f"trainer.seed={job.seed}"])
    if cfg.task.name != job.task:
        raise BertpipeError(f"{job.recipe} is a recipe for task {cfg.task.name}, not {job.task}")
    return cfg


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return ""


def run_job(job: Job, cfg: FinetuneConfig, force: bool, progress_bar: bool) -> bool:
    """Fine-tune one (task, seed) unless it is finished with these settings; True when it trained."""
    results = job.run_dir / "results.json"
    if results.is_file():
        saved = job.run_dir / "config.yaml"
        old = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
        change = _first_difference(old or {}, yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
        if not change:
            log.info("glue: %s seed %d is finished: %s", job.task, job.seed, job.run_dir)
            return False
        if not force:
            raise BertpipeError(f"{job.run_dir} holds a run with other settings ({change}); pass --force to replace "
                                "it, or choose another --out")
    fit(cfg, force=True, progress_bar=progress_bar)
    return True


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize(jobs: list[Job], out: Path, name: str) -> dict:
    """The GLUE table of finished runs: per task the median, min and max of its main metric over the seeds,
    every seed's metrics, and the GLUE average of the medians. A missing run is an error naming it."""
    missing = [str(j.run_dir) for j in jobs if not (j.run_dir / "results.json").is_file()]
    if missing:
        raise BertpipeError(f"{len(missing)} run(s) not finished: {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} (run bertpipe glue without --table)")
    tasks: dict[str, dict] = {}
    first: dict = {}
    train_seconds = 0.0
    for job in jobs:
        res = json.loads((job.run_dir / "results.json").read_text())
        first = first or res
        spec = TASKS[job.task]
        entry = tasks.setdefault(job.task, {"name": NAMES[job.task], "metric": spec.main_metric,
                                            "metric_name": METRIC_NAMES.get(spec.main_metric, spec.main_metric),
                                            "parts": list(spec.mean_of), "recipe": str(job.recipe), "seeds": {}})
        entry["seeds"][str(job.seed)] = {"value": res["metrics"][spec.main_metric], "metrics": res["metrics"],
                                         "run": str(job.run_dir.relative_to(out)),
                                         "train_seconds": res["train_seconds"], "examples": res["examples"],
                                         "examples_per_second": res.get("examples_per_second", 0.0)}
        train_seconds += res["train_seconds"]
    for entry in tasks.values():
        values = [s["value"] for s in entry["seeds"].values()]
        entry |= {"median": _median(values), "min": min(values), "max": max(values), "n": len(values),
                  "part_medians": {p: _median([s["metrics"][p] for s in entry["seeds"].values()])
                                   for p in entry["parts"]}}
    medians = {t: e["median"] for t, e in tasks.items()}
    average = statistics.fmean(medians.values())
    without = [v for t, v in medians.items() if t != WITHOUT]
    metrics = {"average": average} | ({"average_without_wnli": statistics.fmean(without)}
                                      if WITHOUT in medians and without else {}) | medians
    return {
        "task": "glue", "kind": "glue", "name": name, "split": "dev",
        "main_metric": "average", "higher_is_better": True, "metrics": metrics,
        "spread": "min-max", "statistic": "median over seeds",
        "tasks": tasks, "order": list(tasks), "model": first.get("model", {}), "params": first.get("params", 0),
        "train_seconds": round(train_seconds, 3),
        "examples_per_second": statistics.fmean(s["examples_per_second"] for e in tasks.values()
                                                for s in e["seeds"].values()),
        "versions": first.get("versions", {}),
    }


def write_table(summary: dict, out: Path) -> list[Path]:
    from pipeline.leaderboard import glue_chart, glue_csv, glue_markdown

    md, csv_path, png = out / "glue.md", out / "glue.csv", out / "glue.png"
    md.write_text(glue_markdown([(summary["name"], summary)], detail=True))
    csv_path.write_text(glue_csv([(summary["name"], summary)]))
    glue_chart([(summary["name"], summary)], png)
    write_json(out / "results.json", summary)
    return [md, csv_path, png, out / "results.json"]


def claim_out(out: Path) -> None:
    """Make OUT GLUE's own before anything is written there: absent or empty (then marked), or already GLUE's
    (its marker, or a GLUE results.json from before markers); anything else stops with one line. The array tasks
    of one table start together: a marked directory is renamed into place, so none sees it half made."""
    while not _ours(out):
        staged = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".incomplete", dir=out.parent))
            mark(staged, STAGE)
            staged.rename(out)  # onto an absent or empty directory; refused once another task's is there
        except OSError as err:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            if staged is None or err.errno not in _TAKEN:
                raise BertpipeError(f"cannot create {out}: {os_reason(err)}") from None


def _ours(out: Path) -> bool:
    """True when OUT is GLUE's, False when it is absent or empty; raises for anything else."""
    try:
        return claim(out, STAGE) == "ours"
    except BertpipeError:
        if not _summary_before_markers(out):
            raise
        mark(out, STAGE)
        return True


def _summary_before_markers(out: Path) -> bool:
    try:
        return json.loads((out / "results.json").read_text()).get("kind") == "glue"
    except (OSError, ValueError, AttributeError):
        return False


def glue_command(argv: list[str]) -> int:
    from pipeline.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="bertpipe glue", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune one encoder on every GLUE task (CoLA, SST-2, MRPC, STS-B, RTE, WNLI) over several "
                    "seeds and write one GLUE-style table: each task's median and spread (min-max) over its seeds "
                    "and the GLUE average. Reruns resume; finished runs are never trained twice.",
        epilog="examples:\n"
               "  bertpipe glue --encoder build/runs/pretrain --out build/glue/bert\n"
               "  bertpipe glue --preset tiny --vocab build/vocab --out build/glue/random\n"
               "  bertpipe glue --recipes 'recipes/baselines/glue-{task}-bilstm.yaml' --vocab build/vocab "
               "--out build/glue/bilstm\n"
               "  bertpipe glue --encoder DIR --tasks rte,mrpc --seeds 2 trainer.lr=1e-4 sst2:task.max_train=8000")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--encoder", metavar="DIR", help="a pretraining run, an HF BERT directory or a checkpoint "
                       "(sets model.encoder)")
    model.add_argument("--preset", help="a randomly initialized BERT of this size (needs --vocab)")
    parser.add_argument("--vocab", metavar="DIR", help="the tokenizer (sets model.vocab_dir): for --preset and the "
                        "RNN baselines")
    parser.add_argument("--out", default="build/glue", help="where the runs and the table go (default: build/glue)")
    parser.add_argument("--name", help="the table's name for this encoder (default: the --out directory's name)")
    parser.add_argument("--tasks", help=f"comma-separated (default: all: {','.join(GLUE_TASKS)})")
    parser.add_argument("--seeds", help="N for every task, TASK=N for one, e.g. '3,rte=5' (default: 5 for rte, "
                        "mrpc, stsb and cola, 3 for the others)")
    parser.add_argument("--recipes", default=RECIPES, metavar="TEMPLATE",
                        help="each task's recipe, {task} replaced by its name (default: %(default)s)")
    parser.add_argument("--job", type=int, metavar="I", help="run only the I-th (task, seed) of --list and write no "
                        "table (default: SLURM_ARRAY_TASK_ID under `sbatch --array`)")
    parser.add_argument("--list", action="store_true", help="print the (task, seed) runs, one a line, and exit")
    parser.add_argument("--table", action="store_true", help="only write the table, from finished runs")
    parser.add_argument("--force", action="store_true", help="replace finished runs made with other settings")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="[TASK:]key=value",
                        help="a finetune config override for every run, or with TASK: for that task's runs only")
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.quiet)

    out = Path(args.out)
    tasks = parse_tasks(args.tasks)
    jobs = plan(tasks, parse_seeds(args.seeds, tasks), args.recipes, out)
    if args.list:
        for i, job in enumerate(jobs):
            print(f"{i}\t{job.task}\t{job.seed}\t{job.run_dir}")
        return 0
    claim_out(out)
    flags = ([f"model.encoder={args.encoder}"] if args.encoder else []) + \
            (["model.encoder=null", f"model.preset={args.preset}"] if args.preset else []) + \
            ([f"model.vocab_dir={args.vocab}"] if args.vocab else [])
    common, per_task = split_overrides(args.overrides)
    configs = {job: job_config(job, [*flags, *common, *per_task.get(job.task, [])]) for job in jobs}
    if (args.encoder or args.preset) and any(c.model.kind != "bert" for c in configs.values()):
        raise BertpipeError("--encoder and --preset choose a BERT; these recipes train another model kind "
                            "(give the baselines their vocabulary with --vocab)")
    index = args.job if args.job is not None else (int(os.environ["SLURM_ARRAY_TASK_ID"])
                                                    if "SLURM_ARRAY_TASK_ID" in os.environ and not args.table else None)
    if index is not None and not 0 <= index < len(jobs):
        raise BertpipeError(f"--job {index}: there are {len(jobs)} runs (0..{len(jobs) - 1}, see --list)")
    progress_bar = not args.quiet and (sys.stderr.isatty() or os.environ.get("BERTPIPE_PROGRESS") == "1")
    if not args.table:
        start = time.perf_counter()
        todo = [jobs[index]] if index is not None else jobs
        for n, job in enumerate(todo, 1):
            log.info("glue: %s seed %d (%d/%d)", job.task, job.seed, n, len(todo))
            run_job(job, configs[job], args.force, progress_bar)
        log.info("glue: %d run(s) in %.1f s", len(todo), time.perf_counter() - start)
        if index is not None:
            print(jobs[index].run_dir)
            return 0
    paths = write_table(summarize(jobs, out, args.name or out.name), out)
    if not args.quiet:
        print(paths[0].read_text(), end="")
    return 0
