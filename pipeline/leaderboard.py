"""One table of every run: gathers the `results.json` files under a folder into Markdown, CSV and a chart.

It reads nothing but results.json (task, split, metrics, model, params, train_seconds, examples_per_second,
and optionally main_metric / higher_is_better / also_metrics, the metrics shown beside the ranked one), so any
recipe that writes one lands on the board.

A GLUE summary (`bertpipe glue`'s results.json, `"kind": "glue"`) stands for the runs under it: one row per
task with the median over its seeds, and one for the GLUE average. Every summary also becomes a row of the
GLUE-style table (`leaderboard-glue.{md,csv,png}`, and a section of leaderboard.md): encoders and baselines
side by side, a column per task, x100 as GLUE reports, each cell the median over seeds and [min, max].
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
    if str(model.get("encoder", "")).startswith("random init"):  # beside its pretrained twin: say which is which
        parts.append("(random init)")
    return " ".join(parts) or "?"


def is_glue(res: dict) -> bool:
    return res.get("kind") == "glue" and isinstance(res.get("tasks"), dict)


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
    found = _glue_rows(found)
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


def _glue_rows(found: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """A GLUE summary in place of its own runs: a results-like entry per task (the median) and the average."""
    summaries = [p.parent for p, res in found if is_glue(res)]
    out = []
    for path, res in found:
        if not is_glue(res):
            if not any(s in path.parents for s in summaries):
                out.append((path, res))
            continue
        common = {"model": res.get("model", "?"), "params": res.get("params", 0), "higher_is_better": True}
        for task, entry in res["tasks"].items():
            seeds = list(entry["seeds"].values())
            out.append((path, common | {
                "task": task, "main_metric": entry["metric"], "metrics": {entry["metric"]: entry["median"]},
                "train_seconds": sum(s.get("train_seconds", 0.0) for s in seeds) / max(len(seeds), 1),
                "examples_per_second": sum(s.get("examples_per_second", 0.0) for s in seeds) / max(len(seeds), 1)}))
        out.append((path, common | {"task": "glue", "main_metric": "average", "metrics": res["metrics"],
                                    "train_seconds": res.get("train_seconds", 0.0),
                                    "examples_per_second": res.get("examples_per_second", 0.0)}))
    return out


def glue_summaries(runs_dir: str | Path) -> list[tuple[str, dict]]:
    """(name, summary) of every GLUE summary under `runs_dir`, best average first."""
    root = Path(runs_dir)
    found = [(p, _read(p)) for p in sorted(root.rglob("results.json"))]
    named = [(str(p.parent.relative_to(root)) if p.parent != root else res.get("name", root.name), res)
             for p, res in found if is_glue(res)]
    return sorted(named, key=lambda item: -item[1]["metrics"]["average"])


def _glue_columns(summaries: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    """(task, column title) in the order the summaries list their tasks (GLUE's)."""
    columns: dict[str, str] = {}
    for _, res in summaries:
        for task in res.get("order", res["tasks"]):
            entry = res["tasks"][task]
            columns.setdefault(task, f"{entry['name']} ({entry['metric_name']})")
    return list(columns.items())


def glue_markdown(summaries: list[tuple[str, dict]], detail: bool = False) -> str:
    """One row per summary: the median (min-max) of every task, x100, and the GLUE averages; `detail` adds a
    table per summary of every seed's value and the medians of MRPC's and STS-B's two metrics."""
    columns = _glue_columns(summaries)
    lines = ["| model | run | " + " | ".join(title for _, title in columns) + " | average | without WNLI |",
             "|---|---|" + "---|" * (len(columns) + 2)]
    for name, res in summaries:
        cells = []
        for task, _ in columns:
            e = res["tasks"].get(task)
            cells.append(f"{100 * e['median']:.1f} [{100 * e['min']:.1f}, {100 * e['max']:.1f}]" if e else "")
        m = res["metrics"]
        without = f"{100 * m['average_without_wnli']:.1f}" if "average_without_wnli" in m else ""
        lines.append(f"| {_model_name(res.get('model', '?'))} | {name} | " + " | ".join(cells) +
                     f" | **{100 * m['average']:.1f}** | {without} |")
    text = "\n".join(lines) + "\n"
    if detail:
        for name, res in summaries:
            text += (f"\n{name}: median over seeds [min, max], x100\n\n| task | metric | median | [min, max] | "
                     "seeds | per seed | parts (median) |\n|---|---|---|---|---|---|---|\n")
            for e in (res["tasks"][t] for t in res.get("order", res["tasks"])):
                runs = sorted(e["seeds"].items(), key=lambda kv: int(kv[0]))
                seeds = " ".join(f"{100 * s['value']:.1f}" for _, s in runs)
                parts = " / ".join(f"{p} {100 * v:.1f}" for p, v in e.get("part_medians", {}).items())
                text += (f"| {e['name']} | {e['metric_name']} | {100 * e['median']:.1f} | [{100 * e['min']:.1f}, "
                         f"{100 * e['max']:.1f}] | {e['n']} | {seeds} | {parts} |\n")
    return text


def glue_csv(summaries: list[tuple[str, dict]]) -> str:
    """One line per summary and task (and its average): median, min, max and the number of seeds (0-1 scale)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "run", "task", "metric", "median", "min", "max", "seeds"])
    for name, res in summaries:
        model = _model_name(res.get("model", "?"))
        for task in res.get("order", res["tasks"]):
            e = res["tasks"][task]
            writer.writerow([model, name, task, e["metric"], e["median"], e["min"], e["max"], e["n"]])
        for key in ("average", "average_without_wnli"):
            if key in res["metrics"]:
                writer.writerow([model, name, "glue", key, res["metrics"][key], "", "", ""])
    return buf.getvalue()


def glue_chart(summaries: list[tuple[str, dict]], path: Path) -> None:
    """Grouped bars: a group per task (and the average), a bar per summary, whiskers from min to max."""
    columns = [*_glue_columns(summaries), ("average", "GLUE average")]
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(columns)), 4.2))
    for i, (name, res) in enumerate(summaries):
        xs, ys, low, high = [], [], [], []
        for j, (task, _) in enumerate(columns):
            e = res["tasks"].get(task) if task != "average" else {"median": res["metrics"]["average"]}
            if e:
                xs.append(j + (i - (len(summaries) - 1) / 2) * width)
                ys.append(100 * e["median"])
                low.append(100 * (e["median"] - e.get("min", e["median"])))
                high.append(100 * (e.get("max", e["median"]) - e["median"]))
        ax.bar(xs, ys, width, yerr=[low, high], capsize=3, label=f"{_model_name(res.get('model', '?'))} · {name}")
    ax.set_xticks(range(len(columns)), [title.replace(" (", "\n(") for _, title in columns], fontsize=8)
    ax.set_ylabel("dev x100: median, min-max")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    paths = [md, csv_path, png]
    summaries = glue_summaries(runs_dir)
    if summaries:  # the GLUE-style table: encoders and baselines side by side, a column per task
        table = glue_markdown(summaries)
        with open(md, "a") as fh:
            fh.write("\n## GLUE-style (dev, x100: median over seeds [min, max])\n\n" + table)
        paths += [out / "leaderboard-glue.md", out / "leaderboard-glue.csv", out / "leaderboard-glue.png"]
        paths[3].write_text(table)
        paths[4].write_text(glue_csv(summaries))
        glue_chart(summaries, paths[5])
    log.info("leaderboard of %d run(s) in %s", len(rows), out)
    return paths
