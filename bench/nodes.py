"""Two nodes against one: seq/s of `bertpipe pretrain` on 1 node x 2 ranks (one torchrun) beside 2 nodes x 1
rank (two torchrun launchers meeting at a c10d rendezvous on 127.0.0.1, gloo between them), the same run
otherwise; then, on paper, the data-parallel scaling efficiency of BERT base and large at 8, 64 and 512 GPUs.

On one machine both layouts move gradients over loopback TCP, so what differs is the rendezvous (static
against c10d) and gloo across launchers: the cost of "past one node" before any network.

The paper model: per optimizer step every GPU computes FLOPs/token (the MFU convention of metrics.jsonl) x its
tokens, at a datasheet peak x an assumed MFU, and all-reduces the bf16 gradients once (ZeRO-1/2's
reduce-scatter + all-gather move the same bytes): time = bytes x 2(n-1)/n / bus bandwidth, NCCL's bus
bandwidth being what nccl-tests reports. Efficiency = compute / (compute + the all-reduce not hidden behind
the backward pass), bounded by no overlap at all. Latency is left out (optimistic at 512 GPUs).

    .venv/bin/python bench/nodes.py                 # mini, micro-batch 16, 2 ranks on the CPU (~5 min)
    .venv/bin/python bench/nodes.py --paper-only    # only the scaling estimates
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_wiki_shards, ensure_wiki_vocab, table  # noqa: E402

BIN = Path(sys.executable).parent
# Bus bandwidth of a bf16/fp32 NCCL all-reduce at large messages (GB/s), measured with nccl-tests on H100 SXM
# nodes (8 GPUs, NVLink 4 / NVSwitch, 8 x 400 Gb/s NDR InfiniBand per node; NCCL 2.24): one node 479.7, four
# nodes 330.9 (Voltage Park x AI @ Georgia Tech, github.com/aigatech/vpbenchmarking). More nodes keep a ring's
# bus bandwidth about constant, so the 4-node figure stands for 8 and 64 nodes.
BUS_GBPS = {8: 479.7, 64: 330.9, 512: 330.9}
PEAK_TFLOPS, MFU = 989.0, 0.40  # H100 SXM dense bf16 datasheet; the MFU the README's cost table assumes
SEQ = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(layout: str, args, shards: str, vocab: str, tmp: Path) -> dict:
    """Launch one layout ("1x2" or "2x1"), return its steady seq/s and the seconds to its first step."""
    from pipeline.tracking import read_metrics

    run_dir = tmp / layout
    pretrain = [str(BIN / "bertpipe"), "pretrain", "--config", str(ROOT / "recipes/pretrain/tiny-cpu.yaml"),
                f"model.preset={args.preset}", f"data.shards={shards}", f"data.vocab_dir={vocab}", f"run_dir={run_dir}",
                f"data.micro_batch={args.micro_batch}", f"data.global_batch={2 * args.micro_batch}",
                f"max_steps={args.steps + args.warmup}", "eval_every=0", "checkpoint_every=0", "export=false",
                "track.log_every=1", "track.wandb=disabled", f"zero_stage={args.zero_stage}", "--quiet"]
    port = str(free_port())
    if layout == "1x2":
        commands = [[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *pretrain]]
    else:
        commands = [[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "bench",
                     *pretrain] for node in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "WANDB_MODE": "disabled"}
    began = time.time()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{layout} run failed:\n{err[-3000:]}")
    train = [r for r in read_metrics(run_dir) if r["event"] == "train"]
    timed = train[args.warmup - 1:]
    seq_s = 2 * args.micro_batch * (len(timed) - 1) / (timed[-1]["time"] - timed[0]["time"])
    return {"seq_s": seq_s, "first_step_s": train[0]["time"] - began}


def paper() -> list[dict]:
    """The estimated scaling efficiency of base and large at 8, 64 and 512 GPUs, seq 128."""
    from pipeline.model import BertForPreTraining, from_preset

    rows = []
    for preset in ("base", "large"):
        with torch.device("meta"):
            model = BertForPreTraining(from_preset(preset, 30_522))
        grads = model.num_parameters() * 2  # bf16 gradients, one all-reduce per optimizer step
        per_token = model.flops_per_token(SEQ)
        for global_batch in (2048, 65_536):  # the recipes' batch; NVIDIA's LAMB phase-1 batch
            for gpus in (8, 64, 512):
                comm = grads * 2 * (gpus - 1) / gpus / (BUS_GBPS[gpus] * 1e9)
                compute = per_token * global_batch * SEQ / gpus / (PEAK_TFLOPS * 1e12 * MFU)
                hidden = 2 / 3 * compute  # the backward pass, two thirds of the FLOPs, can hide the reduction
                rows.append({
                    "model": preset, "global batch": f"{global_batch:,}", "GPUs": gpus,
                    "seq/GPU/step": global_batch // gpus, "gradients MB": f"{grads / 1e6:.0f}",
                    "bus GB/s": BUS_GBPS[gpus], "all-reduce ms": f"{comm * 1e3:.2f}",
                    "compute ms": f"{compute * 1e3:.2f}",
                    "efficiency, overlapped": f"{compute / (compute + max(0.0, comm - hidden)):.0%}",
                    "no overlap": f"{compute / (compute + comm):.0%}",
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--micro-batch", type=int, default=16, help="per rank; the global batch is twice this")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each layout")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the layouts this many times")
    parser.add_argument("--paper-only", action="store_true")
    parser.add_argument("--shards", help="a shard directory (default: build/shards/wiki-128, built if missing)")
    parser.add_argument("--vocab", help="its vocab directory (default: build/vocab/wiki)")
    args = parser.parse_args()
    if not args.paper_only:
        shards, vocab = args.shards or str(ensure_wiki_shards()), args.vocab or str(ensure_wiki_vocab())
        results: dict[str, list[dict]] = {"1x2": [], "2x1": []}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds):
                for layout in results:
                    results[layout].append(measure(layout, args, shards, vocab, Path(tmp) / f"round{i}"))
        names = {"1x2": "1 node x 2 ranks (torchrun)", "2x1": "2 nodes x 1 rank (2 torchruns, c10d on 127.0.0.1)"}
        rows = [{"layout": names[k], "seq/s": " / ".join(f"{r['seq_s']:.1f}" for r in v),
                 "first step after (s)": " / ".join(f"{r['first_step_s']:.1f}" for r in v)} for k, v in results.items()]
        print(f"nodes benchmark: {args.preset}, micro-batch {args.micro_batch} x 2 ranks, seq <= 128, fp32, "
              f"ZeRO-{args.zero_stage}, gloo, CPU, {args.steps} timed steps after {args.warmup}, one thread a rank")
        print(table(rows, ["layout", "seq/s", "first step after (s)"]))
        mean = {k: sum(r["seq_s"] for r in v) / len(v) for k, v in results.items()}
        print(f"2 nodes / 1 node: {mean['2x1'] / mean['1x2']:.2f}x seq/s")
    print(f"\non paper: H100 SXM bf16 at {MFU:.0%} MFU ({PEAK_TFLOPS:.0f} TFLOP/s peak), seq {SEQ}, bf16 gradients, "
          "NCCL bus bandwidth measured by nccl-tests")
    columns = ["model", "global batch", "GPUs", "seq/GPU/step", "gradients MB", "bus GB/s", "all-reduce ms",
               "compute ms", "efficiency, overlapped", "no overlap"]
    print(table(paper(), columns))


if __name__ == "__main__":
    main()
