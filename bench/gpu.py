"""`make bench-gpu`: everything to measure on one GPU, in one command, under 6 minutes on an H100/H200.

1. The model (bench/model_gpu.py): bertpipe's BERT beside transformers', base and large at seq 128 and 512,
   bf16 autocast, fused AdamW, each encoder layer compiled in place: seq/s and MFU.
2. The whole pretrain loop: 50 timed steps of `bertpipe pretrain` with the bert-base-128 and bert-large-128
   recipes' models under DeepSpeed ZeRO-1 and ZeRO-2, bf16, torch's fused AdamW (the recipes' LAMB needs ZeRO
   stage 0), micro-batch 256 padded to 128 (one shape: compiled once), each run in its own process, its seq/s
   from the wall-clock timestamps of its own metrics -- beside the bare model step of part 1 on a batch of the
   same size: the loop's overhead.

Data, built once under build/bench-gpu (no network): a 30k WordPiece vocabulary and seq-128 shards of the
first 8 Wikipedia files of DATA_DIR. Output: build/bench-gpu/bench-gpu.json and the tables on stdout.
Goals: BERT-large at seq 128 at least 55% MFU (FLOPs by BertForPreTraining.flops_per_token); the loop within
5% of the bare step.

    make bench-gpu                                       # = .venv/bin/python bench/gpu.py
    .venv/bin/python bench/gpu.py --device cpu --tiny    # every code path on the CPU, tiny sizes (a test runs it)
Without a GPU (and without --device cpu) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_gpu  # noqa: E402
from common import ROOT  # noqa: E402

WIKI_FILES = 8


def data_dir() -> Path | None:
    path = Path(os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "data")
    return path if (path / "pretrain" / "wikipedia").is_dir() else None


def build_data(out: Path, tiny: bool) -> tuple[Path, Path]:
    """A vocabulary and seq-128 shards for the loop, built once (Wikipedia from DATA_DIR, else the embedded
    Python documentation)."""
    from pipeline.config import load_config
    from pipeline.shard import ShardConfig, build_shards
    from pipeline.vocab import VocabConfig, build_vocab

    data = data_dir()
    files = sorted((data / "pretrain" / "wikipedia" / "AA").glob("wiki_*"))[: 2 if tiny else WIKI_FILES] if data \
        else []
    inputs = ",".join(f"{{path: '{f}', format: wikiextractor}}" for f in files) or "{path: pydoc}"
    vocab, shards = out / "vocab", out / "shards"
    build_vocab(load_config(VocabConfig, None, [f"corpus.inputs=[{inputs}]", f"output_dir={vocab}",
                                                f"vocab_size={4000 if tiny else 30000}"]))
    build_shards(load_config(ShardConfig, None, [f"corpus.inputs=[{inputs}]", f"vocab_dir={vocab}",
                                                 f"output_dir={shards}", "max_seq_len=128", "workers=0"]))
    return vocab, shards


def model_rows(args: argparse.Namespace, device: torch.device, peak: float | None) -> list[dict]:
    bench = model_gpu.parser().parse_args([
        "--presets", ",".join(args.presets), "--seqs", ",".join(map(str, args.seqs)), "--tokens", str(args.tokens),
        "--steps", str(args.model_steps), "--warmup", str(args.model_warmup), "--compile", args.compile,
        "--compile-backend", args.compile_backend, "--device", str(device)])
    print("\n".join(model_gpu.describe(device, bench, "")[1:]))
    print("\n" + model_gpu.HEADER, flush=True)
    rows = []
    for preset in args.presets:
        for seq in args.seqs:
            rows.append(model_gpu.measure(preset, seq, bench, device, peak))
            print(model_gpu.format_row(rows[-1]), flush=True)
    return rows


def loop_run(preset: str, zero: int, args: argparse.Namespace, vocab: Path, shards: Path, out: Path) -> dict:
    """One `bertpipe pretrain` process: the recipe's model, ZeRO `zero`, bf16, fused AdamW; seq/s and MFU over
    the timed steps, from its metrics.jsonl."""
    recipe = "recipes/pretrain/tiny-cpu.yaml" if args.tiny else f"recipes/pretrain/bert-{preset}-128.yaml"
    run_dir = out / "runs" / f"{preset}-zero{zero}"
    warmup, steps, every = args.loop_warmup, args.loop_steps, args.log_every
    batch = args.tokens // 128
    cmd = [sys.executable, "-m", "pipeline.cli", "pretrain", "--config", str(ROOT / recipe), f"run_dir={run_dir}",
           f"data.shards={shards}", f"data.vocab_dir={vocab}", f"model.preset={preset}", f"zero_stage={zero}",
           "precision=bf16", "optim.name=adamw", "optim.lr=1e-4", "optim.warmup_steps=10", "optim.warmup_proportion=0",
           "optim.schedule=linear", "optim.schedule_start=0", f"data.micro_batch={batch}",
           f"data.global_batch={batch}", "data.masking.pad_to=128", "data.masking.max_predictions=20",
           f"data.loader_workers={1 if args.tiny else 4}", f"max_steps={warmup + steps}", "eval_every=0",
           "checkpoint_every=0", "export=false", "probe.every=0", "track.wandb=disabled", f"track.log_every={every}",
           f"model.compile={args.compile != 'none'}", f"model.compile_backend={args.compile_backend}", "--quiet"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"preset": preset, "zero": zero, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                "seconds": round(seconds, 1)}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["event"] == "train"}
    first, last = train[warmup], train[warmup + steps]
    seq_per_s = batch * steps / (last["time"] - first["time"])  # wall clock, logging and loading included
    timed = [r for s, r in train.items() if warmup < s <= warmup + steps]
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    return {"preset": preset, "zero": zero, "batch": batch, "steps": steps, "seq_per_s": seq_per_s,
            "mfu_median": statistics.median(mfu) if mfu else None,
            "memory_mb": max(r["memory_mb"] for r in timed), "process_seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check every code path")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and few steps: a check of the script")
    parser.add_argument("--out", type=Path, help="the JSON file (default: build/bench-gpu/bench-gpu.json)")
    parser.add_argument("--skip-model", action="store_true", help="only the pretrain loop")
    parser.add_argument("--skip-loop", action="store_true", help="only the model benchmark")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; `make bench-gpu` measures on a GPU (try --device cpu "
              "--tiny to check the script)")
        return 0
    tiny = args.tiny
    args.presets = ["tiny"] if tiny else ["base", "large"]
    args.seqs = [64, 128] if tiny else [128, 512]
    args.tokens = 8 * 128 if tiny else 32768  # batch 256 at seq 128 (8 at 128 when tiny)
    args.model_steps, args.model_warmup = (2, 1) if tiny else (10, 3)
    args.loop_warmup, args.loop_steps, args.log_every = (2, 4, 2) if tiny else (10, 50, 10)
    args.compile = "layers"
    args.compile_backend = "eager" if device.type == "cpu" else "inductor"  # inductor on a CPU takes minutes
    out = ROOT / "build" / "bench-gpu"
    out.mkdir(parents=True, exist_ok=True)
    json_path = args.out or out / "bench-gpu.json"
    started = time.perf_counter()

    torch.set_float32_matmul_precision("high")
    peak, peak_text = model_gpu.peak_flops(device, None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    print(f"make bench-gpu on {name}; peak {peak_text}; torch {torch.__version__}")
    vocab, shards = build_data(out, tiny)
    report = {"device": name, "peak": peak_text, "torch": torch.__version__, "convention": model_gpu.CONVENTION,
              "goals": {"large_128_mfu": 0.55, "loop_overhead": 0.05}, "model": [], "loop": []}
    if not args.skip_model:
        report["model"] = model_rows(args, device, peak)
    if not args.skip_loop:
        print(f"\npretrain loop: DeepSpeed, one {device.type.upper()}, bf16, fused AdamW, batch {args.tokens // 128} "
              f"x seq 128, {args.loop_steps} timed steps after {args.loop_warmup}")
        print(f"{'preset':<8}{'ZeRO':>5}{'loop seq/s':>12}{'MFU':>8}{'bare seq/s':>12}{'overhead':>10}")
        bare = {r["preset"]: r["bertpipe"].get("seq_per_s") for r in report["model"] if r["seq"] == 128}
        for preset in args.presets:
            for zero in (1, 2):
                row = loop_run(preset, zero, args, vocab, shards, out)
                if "error" in row:
                    print(f"{preset:<8}{zero:>5}  failed: {row['error'][0]}", flush=True)
                else:
                    row["bare_seq_per_s"] = bare.get(preset)
                    row["overhead"] = row["bare_seq_per_s"] / row["seq_per_s"] - 1 if row["bare_seq_per_s"] else None
                    mfu = f"{row['mfu_median']:.1%}" if row["mfu_median"] is not None else "n/a"
                    overhead = f"{row['overhead']:+.1%}" if row["overhead"] is not None else "n/a"
                    bare_text = f"{row['bare_seq_per_s']:.1f}" if row["bare_seq_per_s"] else "n/a"
                    print(f"{preset:<8}{zero:>5}{row['seq_per_s']:>12.1f}{mfu:>8}{bare_text:>12}{overhead:>10}",
                          flush=True)
                report["loop"].append(row)
    report["seconds"] = round(time.perf_counter() - started, 1)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['seconds']:.0f} s in all; {json_path}")
    return 1 if any("error" in r for r in report["loop"]) else 0


if __name__ == "__main__":
    sys.exit(main())
