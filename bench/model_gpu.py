"""Training throughput and MFU on one GPU: bertpipe's BERT base and large at seq 128 and 512 in bf16.

A step is forward + backward + fused AdamW under bf16 autocast (fp32 master weights), each encoder layer
compiled in place with torch.compile (one layer's code compiles once, so large starts as fast as base);
transformers' BertForPreTraining runs the same config, weights, batch and compilation beside it.
FLOPs follow `BertForPreTraining.flops_per_token` (printed below); MFU = achieved FLOP/s / the GPU's peak.
Goal on one H100: BERT-large at seq 128 at least 2,260 seq/s (about 55% MFU).

    .venv/bin/python bench/model_gpu.py                              # base and large, seq 128 and 512
    .venv/bin/python bench/model_gpu.py --presets large --seqs 128 --no-transformers
    .venv/bin/python bench/model_gpu.py --device cpu --presets tiny --seqs 64 --batch 4 --steps 2 --warmup 1 \
        --compile-backend eager
                                                                     # a quick check of the script itself
Without a GPU (and without --device cpu) it prints a note and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
from model_cpu import masked_batch, time_steps, train_step, transformers_inputs, transformers_twin

from pipeline.model import PRESETS, BertForPreTraining, from_preset

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAKS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
         "A10G": 125e12, "L4": 121e12}

CONVENTION = ("FLOPs per token = 6 x encoder parameters + 12 x L x H x S (attention scores and weighted sum) "
              "+ 6 x (H^2 + H x V) x masked fraction (MLM head on masked positions only); "
              "embeddings, pooler and NSP head left out. transformers is counted by the same convention.")


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "unknown (not a GPU): no MFU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS.items():  # most specific names first
        if key in name:
            return value, f"{value / 1e12:g} TFLOP/s dense bf16 ({name})"
    return None, f"unknown for {name}: pass --peak-tflops for MFU"


def compiled(model: torch.nn.Module, mode: str, backend: str = "inductor") -> torch.nn.Module:
    """`model` compiled: "layers" compiles each encoder layer in place (bertpipe's and transformers' share the
    `bert.encoder.layer` layout), "model" the whole model, "none" leaves it eager."""
    if mode == "layers":
        for layer in model.bert.encoder.layer:
            layer.compile(backend=backend)
        return model
    return torch.compile(model, backend=backend) if mode == "model" else model


def run(model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Median seconds per step and peak memory (GB) of training `model` on `batch`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = train_step(compiled(model, args.compile, args.compile_backend), batch, args.precision)
    seconds = statistics.median(time_steps(step, args.steps, args.warmup, sync))
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return seconds, memory


def free(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between runs, so each starts from the same state."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="base,large", help="comma-separated, from " + ", ".join(PRESETS))
    parser.add_argument("--seqs", default="128,512", help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / seq)")
    parser.add_argument("--batch", type=int, help="sequences per batch (overrides --tokens)")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--masked", type=float, default=0.15, help="fraction of each row's tokens masked")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model (compilation happens here)")
    parser.add_argument("--compile", default="layers", choices=["layers", "model", "none"],
                        help="torch.compile each encoder layer in place (default), the whole model, or nothing")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: capture only)")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="none", help="run eagerly")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer (bertpipe)")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="skip transformers' model (halves the runtime)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak in TFLOP/s, if not in the built-in table")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script itself")
    return parser


def measure(preset: str, seq: int, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """One row: bertpipe (and transformers) training on the same batch: seq/s, MFU, peak GB."""
    batch_size = args.batch or max(1, args.tokens // seq)
    torch.manual_seed(0)
    config = from_preset(preset, args.vocab_size, gradient_checkpointing=args.checkpointing)
    model = BertForPreTraining(config).to(device).train()
    flops = model.flops_per_token(seq, args.masked)
    batch = masked_batch(args.vocab_size, batch_size, seq, args.masked)
    row = {"preset": preset, "seq": seq, "batch": batch_size, "flops_per_token": flops}
    for name in ("bertpipe", "transformers")[: 1 + args.transformers]:
        try:
            if name == "bertpipe":
                seconds, memory = run(model, batch, args, device)
            else:
                twin = transformers_twin(model).train()
                if args.checkpointing:
                    twin.gradient_checkpointing_enable()
                seconds, memory = run(twin, transformers_inputs(batch), args, device)
                del twin
            row[name] = {"seq_per_s": batch_size / seconds, "step_s": seconds,
                         "memory_gb": memory if memory == memory else None,  # NaN (no CUDA) is not JSON
                         "mfu": batch_size / seconds * seq * flops / peak if peak else None}
        except torch.cuda.OutOfMemoryError:
            row[name] = {"error": "out of memory"}
        free(device)
    del model
    free(device)
    return row


def format_row(row: dict) -> str:
    text = f"{row['preset']:<7}{row['seq']:>5}{row['batch']:>6}{row['flops_per_token'] / 1e9:>10.2f}"
    for name, width in (("bertpipe", 16), ("transformers", 20)):
        result = row.get(name)
        if result is None:
            continue
        if "error" in result:
            text += f"{result['error']:>{width}}{'':>13}"
            continue
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
        memory = f"{result['memory_gb']:.1f}" if result["memory_gb"] is not None else "n/a"
        text += f"{result['seq_per_s']:>{width}.0f}{mfu:>7}{memory:>6}"
    if "seq_per_s" in row.get("bertpipe", {}) and "seq_per_s" in row.get("transformers", {}):
        text += f"{row['bertpipe']['seq_per_s'] / row['transformers']['seq_per_s']:>6.2f}x"
    return text


HEADER = (f"{'preset':<7}{'seq':>5}{'batch':>6}{'GFLOP/tok':>10}{'bertpipe seq/s':>16}{'MFU':>7}{'GB':>6}"
          f"{'transformers seq/s':>20}{'MFU':>7}{'GB':>6}{'ratio':>7}")


def describe(device: torch.device, args: argparse.Namespace, peak_text: str) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return [f"device: {name}; peak {peak_text}",
            f"{args.precision} autocast, fp32 weights, fused AdamW, compile={args.compile}, "
            f"checkpointing={args.checkpointing}, torch {torch.__version__}", CONVENTION]


def main() -> int:
    args = parser().parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, nothing to measure (bench/model_cpu.py runs on the CPU)")
        return 0
    torch.set_float32_matmul_precision("high")  # fp32 leftovers (the loss in fp32) on TF32 tensor cores
    peak, peak_text = peak_flops(device, args.peak_tflops)
    print("\n".join(describe(device, args, peak_text)))
    print("\n" + HEADER)
    for preset in args.presets.split(","):
        for seq in map(int, args.seqs.split(",")):
            print(format_row(measure(preset, seq, args, device, peak)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
