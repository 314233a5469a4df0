"""Tokens seen and training FLOPs of every pretraining recipe (the README's table), by the MFU convention of
`BertForPreTraining.flops_per_token` (padded positions count; vocabulary 30,522, BERT's), and GPU-hours at a
stated MFU on an H100 (989 TFLOP/s dense bf16). The sequence length is the recipe's phase (512 for *-512;
the shards decide in a real run); a time-based recipe is counted at the steps 8 H100s reach in its budget.

    .venv/bin/python bench/pretrain_recipes.py                  # 40% MFU
    .venv/bin/python bench/pretrain_recipes.py --mfu 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.model import BertForPreTraining, from_preset
from pipeline.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("bert-base-128", "bert-base-512", "bert-large-128", "bert-large-512", "bert-base-paper-128",
           "bert-base-paper-512", "bert-large-24h", "cpu-wiki", "tiny-cpu")
H100 = 989e12
GPUS = 8  # the GPU count the time-based recipe states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.40)
    args = parser.parse_args()
    print("| recipe | model | seq | global batch | steps | tokens seen | FLOPs | H100-hours at "
          f"{args.mfu:.0%} MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in RECIPES:
        cfg = load_config(PretrainConfig, ROOT / "recipes" / "pretrain" / f"{name}.yaml")
        seq = 512 if name.endswith("512") else 128
        with torch.device("meta"):
            model = BertForPreTraining(from_preset(cfg.model.preset, 30522))
        flops_per_token = model.flops_per_token(seq, cfg.data.masking.mlm_probability)
        steps, note = cfg.max_steps, ""
        if cfg.optim.schedule_hours:  # a time budget: the steps 8 H100s at this MFU fit into it
            seconds = cfg.optim.schedule_hours * 3600 * GPUS
            steps = int(seconds * args.mfu * H100 / (flops_per_token * cfg.data.global_batch * seq))
            note = f" ({cfg.optim.schedule_hours:g} h on {GPUS} H100s)"
        tokens = steps * cfg.data.global_batch * seq
        flops = tokens * flops_per_token
        print(f"| `{name}` | {cfg.model.preset} | {seq} | {cfg.data.global_batch:,} | {steps:,}{note} | "
              f"{_count(tokens)} | {flops:.2e} | {flops / (args.mfu * H100) / 3600:.3g} |")


def _count(n: float) -> str:
    return f"{n / 1e9:,.1f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"

if __name__ == "__main__":
    main()
