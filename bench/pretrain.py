"""Pretrain loop overhead: seq/s of `bertpipe pretrain` on one rank against the bare model step, same run.

The bare step (bench/model_cpu.py's forward + backward + AdamW, no data loading, no DeepSpeed, no logging)
runs on batches collated beforehand from the same shards; then the whole loop runs in the same process
(DeepSpeed engine, loader with a worker process, masking, metrics, W&B offline) on the same model config.
The loop's seq/s comes from the wall-clock timestamps of its metrics, logging included.

    .venv/bin/python bench/pretrain.py                          # mini, batch 32, seq 128 (CPU: ~3 min)
    .venv/bin/python bench/pretrain.py --preset large --precision bf16 --steps 50   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_wiki_shards, ensure_wiki_vocab, table  # noqa: E402
from model_cpu import time_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--shards", help="a shard directory (default: build/shards/wiki-128, built if missing)")
    parser.add_argument("--vocab", help="its vocab directory (default: build/vocab/wiki)")
    args = parser.parse_args()
    shards_dir = args.shards or str(ensure_wiki_shards())
    vocab_dir = args.vocab or str(ensure_wiki_vocab())

    from pipeline.collate import MaskingConfig, MLMCollator
    from pipeline.config import load_config
    from pipeline.dataset import PretrainingLoader, ShardSet
    from pipeline.model import BertForPreTraining, autocast, from_preset
    from pipeline.pretrain import MODEL_INPUTS, PretrainConfig, pretrain
    from pipeline.tracking import read_metrics
    from tokenization import load_tokenizer, special_ids

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    special = special_ids(load_tokenizer(vocab_dir))
    shards = ShardSet(shards_dir)
    collator = MLMCollator(special, MaskingConfig(max_predictions=round(shards.max_seq_len * 5 / 32)))
    loader = PretrainingLoader(shards, collator, args.batch, seed=1)
    batches = []
    for batch in loader:
        batches.append({k: batch[k].to(device) for k in MODEL_INPUTS})
        if len(batches) == args.steps + args.warmup:
            break

    torch.manual_seed(0)
    model = BertForPreTraining(from_preset(args.preset, special.vocab_size)).to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=1e-4, eps=1e-6)
    feed = iter(batches)

    def bare_step() -> None:
        with autocast(device.type, args.precision):
            loss = model(**next(feed)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bare = time_steps(bare_step, args.steps, args.warmup, sync)
    del bare_step  # free the model before the loop builds its own
    bare_seq_s = args.batch / statistics.median(bare)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(PretrainConfig, None, [
            f"run_dir={tmp}/run", f"model.preset={args.preset}", f"data.shards={shards_dir}",
            f"data.vocab_dir={vocab_dir}", f"data.micro_batch={args.batch}", f"data.global_batch={args.batch}",
            "data.loader_workers=1", f"max_steps={args.steps + args.warmup}", "eval_every=0", "checkpoint_every=0",
            "export=false", "track.log_every=1", "track.wandb=offline", f"precision={args.precision}",
            "optim.warmup_steps=1",
        ])
        pretrain(cfg)
        train = [r for r in read_metrics(f"{tmp}/run") if r["event"] == "train"]
    timed = train[args.warmup - 1:]
    loop_seq_s = args.batch * (len(timed) - 1) / (timed[-1]["time"] - timed[0]["time"])
    mfu = statistics.median(r["mfu"] for r in timed if r["mfu"] is not None) if timed[0]["mfu"] is not None else None

    print(f"pretrain benchmark: {args.preset}, vocab {special.vocab_size}, batch {args.batch}, seq <= "
          f"{shards.max_seq_len}, {args.precision}, {device.type}, {args.steps} timed steps after {args.warmup}")
    rows = [{"run": "bare model step (no data, no DeepSpeed)", "seq/s": f"{bare_seq_s:.1f}"},
            {"run": "bertpipe pretrain loop (wall clock)", "seq/s": f"{loop_seq_s:.1f}",
             "MFU": f"{mfu:.1%}" if mfu is not None else ""}]
    print(table(rows, ["run", "seq/s", "MFU"]))
    print(f"loop overhead: {(bare_seq_s / loop_seq_s - 1):+.1%} (goal <= 5%)")


if __name__ == "__main__":
    main()
