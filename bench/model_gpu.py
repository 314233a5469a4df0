"""Training throughput and MFU on one GPU: bertpipe's BERT base and large at seq 128 and 512 in bf16.

A step is forward + backward + fused AdamW under bf16 autocast (fp32 master weights), compiled with
torch.compile; transformers' BertForPreTraining runs the same config, weights and batch beside it.
FLOPs follow `BertForPreTraining.flops_per_token` (printed below); MFU = achieved FLOP/s / the GPU's peak.
Goal on one H100: BERT-large at seq 128 at least 2,260 seq/s (about 55% MFU).

    .venv/bin/python bench/model_gpu.py                              # base and large, seq 128 and 512
    .venv/bin/python bench/model_gpu.py --presets large --seqs 128 --no-transformers
    .venv/bin/python bench/model_gpu.py --device cpu --presets tiny --seqs 64 --batch 4 --steps 2 --warmup 1
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


def run(model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Median seconds per step and peak memory (GB) of training `model` on `batch`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = train_step(torch.compile(model) if args.compile else model, batch, args.precision)
    seconds = statistics.median(time_steps(step, args.steps, args.warmup, sync))
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return seconds, memory


def free(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between runs, so each starts from the same state."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
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
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer (bertpipe)")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="skip transformers' model (halves the runtime)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak in TFLOP/s, if not in the built-in table")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script itself")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, nothing to measure (bench/model_cpu.py runs on the CPU)")
        return 0
    torch.set_float32_matmul_precision("high")  # fp32 leftovers (the loss in fp32) on TF32 tensor cores
    peak, peak_text = peak_flops(device, args.peak_tflops)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; peak {peak_text}")
    print(f"{args.precision} autocast, fp32 weights, fused AdamW, compile={args.compile}, "
          f"checkpointing={args.checkpointing}, torch {torch.__version__}")
    print(CONVENTION)

    header = (f"{'preset':<7}{'seq':>5}{'batch':>6}{'GFLOP/tok':>10}{'bertpipe seq/s':>16}{'MFU':>7}{'GB':>6}"
              f"{'transformers seq/s':>20}{'MFU':>7}{'GB':>6}{'ratio':>7}")
    print("\n" + header)
    for preset in args.presets.split(","):
        for seq in map(int, args.seqs.split(",")):
            batch_size = args.batch or max(1, args.tokens // seq)
            torch.manual_seed(0)
            config = from_preset(preset, args.vocab_size, gradient_checkpointing=args.checkpointing)
            model = BertForPreTraining(config).to(device).train()
            flops = model.flops_per_token(seq, args.masked)
            batch = masked_batch(args.vocab_size, batch_size, seq, args.masked)
            row = f"{preset:<7}{seq:>5}{batch_size:>6}{flops / 1e9:>10.2f}"
            results = {}
            for name in ("bertpipe", "transformers")[: 1 + args.transformers]:
                width = 16 if name == "bertpipe" else 20
                try:
                    if name == "bertpipe":
                        seconds, memory = run(model, batch, args, device)
                    else:
                        twin = transformers_twin(model).train()
                        if args.checkpointing:
                            twin.gradient_checkpointing_enable()
                        seconds, memory = run(twin, transformers_inputs(batch), args, device)
                        del twin
                    results[name] = batch_size / seconds
                    mfu = f"{results[name] * seq * flops / peak:.1%}" if peak else "n/a"
                    row += f"{results[name]:>{width}.0f}{mfu:>7}{memory:>6.1f}"
                except torch.cuda.OutOfMemoryError:
                    row += f"{'out of memory':>{width}}{'':>13}"
                free(device)
            if len(results) == 2:
                row += f"{results['bertpipe'] / results['transformers']:>6.2f}x"
            print(row, flush=True)
            del model
            free(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
