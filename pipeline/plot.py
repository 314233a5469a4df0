"""Loss and throughput curves of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import BertpipeError  # noqa: E402
from pipeline.tracking import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write plots/loss.png (train and eval losses, accuracies) and plots/throughput.png; return their paths."""
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
    return [loss_png, speed_png]
