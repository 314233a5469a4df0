"""One table of every run: gathers the `results.json` files under a folder into Markdown, CSV and a chart.

It reads nothing but results.json (task, split, metrics, model, params, train_seconds, examples_per_second,
and optionally main_metric / higher_is_better / also_metrics, the metrics shown beside the ranked one), so any
recipe that writes one lands on the board.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import BertpipeError  # noqa: E402

log = logging.getLogger(__name__)
PREFERRED = ("f1", "accuracy", "bleu", "reconstruction_mse", "mse")  # the headline metric when a run names none
LOWER_IS_BETTER = ("mse", "loss", "error", "perplexity")
COLUMNS = ("task", "model", "metric", "value", "also", "params", "train_seconds", "examples_per_second", "run")


def _model_name(model: dict | str) -> str:
    if isinstance(model, str):
        return model
    parts = [str(model.get(k)) for k in ("kind", "size") if model.get(k)]
    return " ".join(parts) or "?"


def _read(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
        if not isinstance(res["metrics"], dict) or not res["metrics"]:
            raise ValueError("no metrics")
        return res
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BertpipeError(f"{path}: not a readable results.json ({err})") from None


def _task_metric(results: list[dict]) -> str | None:
    """The one metric a task is ranked by: the one its runs name, else the first preferred all of them have."""
    named = [r["main_metric"] for r in results if r.get("main_metric")]
    if named:
        return max(set(named), key=named.count)
    common = set.intersection(*(set(r["metrics"]) for r in results))
    return next((m for m in PREFERRED if m in common), min(common) if common else None)


def gather(runs_dir: str | Path) -> list[dict]:
    """One row per results.json under `runs_dir`, ranked by its task's metric, best first within each task."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise BertpipeError(f"runs directory not found: {runs_dir}")
    found = [(p, _read(p)) for p in sorted(root.rglob("results.json"))]
    if not found:
        raise BertpipeError(f"no results.json under {runs_dir}: run some recipes first")
    rows = []
    for task in sorted({res.get("task", "?") for _, res in found}):
        runs = [(p, res) for p, res in found if res.get("task", "?") == task]
        metric = _task_metric([res for _, res in runs])
        for path, res in runs:
            if metric not in res["metrics"]:
                log.warning("%s has no %s, the metric %s is ranked by: left out", path, metric, task)
                continue
            higher = res.get("higher_is_better", not any(s in metric for s in LOWER_IS_BETTER))
            also = [m for m in res.get("also_metrics") or () if m != metric and m in res["metrics"]]
            rows.append({
                "task": task, "model": _model_name(res.get("model", "?")), "metric": metric,
                "value": float(res["metrics"][metric]), "higher_is_better": bool(higher),
                "also": " ".join(f"{m} {float(res['metrics'][m]):.4f}" for m in also),  # squad: exact_match
                "params": int(res.get("params", 0)), "train_seconds": float(res.get("train_seconds", 0.0)),
                "examples_per_second": float(res.get("examples_per_second", 0.0)),
                "run": str(path.parent.relative_to(root)) or ".",
            })
    return sorted(rows, key=lambda r: (r["task"], -r["value"] if r["higher_is_better"] else r["value"], r["model"]))


def _markdown(rows: list[dict]) -> str:
    lines = ["| task | model | metric | value | also | parameters | train time (s) | examples/s | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        lines.append(f"| {r['task']} | {r['model']} | {r['metric']} {arrow} | {r['value']:.4f} | {r['also']} | "
                     f"{r['params']:,} | {r['train_seconds']:.1f} | {r['examples_per_second']:.1f} | {r['run']} |")
    return "\n".join(lines) + "\n"


def _chart(rows: list[dict], path: Path) -> None:
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 1.2 + 0.45 * len(rows) + 0.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        mine = [r for r in rows if r["task"] == task][::-1]
        bars = ax.barh([r["model"] for r in mine], [r["value"] for r in mine], color="#4C72B0")
        ax.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
        ax.set_title(f"{task} — {mine[0]['metric']} ({'higher' if mine[0]['higher_is_better'] else 'lower'} is better)",
                     fontsize=10)
        ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_leaderboard(runs_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write leaderboard.md, leaderboard.csv and leaderboard.png into `out_dir` (default: `runs_dir`)."""
    rows = gather(runs_dir)
    out = Path(out_dir or runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.png"
    md.write_text(_markdown(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "higher_is_better"])
    writer.writeheader()
    writer.writerows(rows)
    csv_path.write_text(buf.getvalue())
    _chart(rows, png)
    log.info("leaderboard of %d run(s) in %s", len(rows), out)
    return [md, csv_path, png]
