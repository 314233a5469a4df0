"""Training tokens/s of the explicit Elman RNN (recipes/rnn.py, unrolled in Python) against torch's fused
nn.RNN, nn.GRU and nn.LSTM on the same batch: forward and backward, CPU.

    .venv/bin/python bench/rnn.py --batch 64 --length 64 --hidden 256 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from recipes.rnn import ElmanRNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def measure(rnn: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Seconds of one forward + backward, the median of `repeats` after one warm-up."""
    times = []
    for i in range(repeats + 1):
        rnn.zero_grad()
        start = time.perf_counter()
        out, _ = rnn(x)
        out.sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="sequences per batch")
    parser.add_argument("--length", type=int, default=64, help="time steps per sequence")
    parser.add_argument("--input", type=int, default=128, help="input (embedding) size")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.input)
    models = {
        "explicit Elman": ElmanRNN(args.input, args.hidden, args.layers),
        "nn.RNN (tanh)": nn.RNN(args.input, args.hidden, args.layers, batch_first=True),
        "nn.GRU": nn.GRU(args.input, args.hidden, args.layers, batch_first=True),
        "nn.LSTM": nn.LSTM(args.input, args.hidden, args.layers, batch_first=True),
    }
    tokens = args.batch * args.length
    rows = []
    for name, rnn in models.items():
        seconds = measure(rnn, x, args.repeats)
        rows.append({"model": name, "ms/step": f"{seconds * 1000:.1f}", "tokens/s": f"{tokens / seconds:,.0f}"})
    base = float(rows[1]["ms/step"])
    for row in rows:
        row["vs nn.RNN"] = f"{float(row['ms/step']) / base:.2f}x time"
    print(f"batch {args.batch} x {args.length} steps, input {args.input}, hidden {args.hidden}, "
          f"layers {args.layers}, {args.threads} thread(s), torch {torch.__version__}")
    print(table(rows, ["model", "ms/step", "tokens/s", "vs nn.RNN"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
