"""Loss, throughput and probe curves of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import BertpipeError  # noqa: E402
from pipeline.tracking import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write plots/loss.png (train and eval losses, accuracies), plots/throughput.png and, when the run ran
    probes, plots/probe.png (probe accuracy against compute); return their paths."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    if not train:
        raise BertpipeError(f"no training metrics in {run_dir}/metrics.jsonl")
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    steps = [r["step"] for r in train]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("mlm_loss", "--"), ("nsp_loss", ":")):
        ax_loss.plot(steps, [r[key] for r in train], style, label=f"train {key}")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    for key in ("mlm_acc", "nsp_acc"):
        ax_acc.plot(steps, [r[key] for r in train], label=f"train {key}")
        if evals:
            ax_acc.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=f"eval {key}")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    fig, (ax_seq, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4))
    ax_seq.plot(steps, [r["seq_per_s"] for r in train])
    ax_seq.set(xlabel="step", ylabel="sequences / s", title="throughput")
    ax_mfu.plot(steps, [r["tflops"] for r in train])
    ax_mfu.set(xlabel="step", ylabel="TFLOP/s", title="model TFLOP/s")
    fig.tight_layout()
    speed_png = out / "throughput.png"
    fig.savefig(speed_png, dpi=110)
    plt.close(fig)
    probes = [r for r in records if r["event"] == "probe"]
    return [loss_png, speed_png] + ([plot_probes(probes, evals, out / "probe.png")] if probes else [])


def plot_probes(probes: list[dict], evals: list[dict], path: Path) -> Path:
    """Time to accuracy: each probe task's dev score against FLOPs (and device-hours), beside held-out MLM
    accuracy against the same compute."""
    fig, (ax_probe, ax_mlm) = plt.subplots(1, 2, figsize=(11, 4))
    by_task: dict[str, list[dict]] = {}
    for r in sorted(probes, key=lambda r: r["step"]):
        by_task.setdefault(r["recipe"], []).append(r)
    for name, rows in by_task.items():
        ax_probe.plot([r["flops"] for r in rows], [r["value"] for r in rows], "o-", label=f"{name} {rows[0]['metric']}")
        for r in rows:
            ax_probe.annotate(f"{r['step']}", (r["flops"], r["value"]), textcoords="offset points", xytext=(0, 6),
                              fontsize=7, ha="center")
    ax_probe.set(xlabel="pretraining FLOPs", ylabel="probe dev score (fine-tuned briefly)",
                 title="time to accuracy (labels: step)")
    ax_probe.legend()
    hours = [r for rows in by_task.values() for r in rows if r.get("device_hours")]
    if hours:  # a second axis in device-hours, from the probes' own (flops, hours) pairs
        per_hour = max(r["flops"] for r in hours) / max(r["device_hours"] for r in hours)
        top = ax_probe.secondary_xaxis("top", functions=(lambda f: f / per_hour, lambda h: h * per_hour))
        top.set_xlabel("device-hours")
    evals = [r for r in evals if "flops" in r]
    if evals:
        ax_mlm.plot([r["flops"] for r in evals], [r["mlm_acc"] for r in evals], "o-", label="held-out MLM accuracy")
        ax_mlm.legend()
    ax_mlm.set(xlabel="pretraining FLOPs", ylabel="accuracy", title="held-out masked-token accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
