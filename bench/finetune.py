"""Fine-tuning throughput: bertpipe's BERT sequence classifier against transformers' BertForSequenceClassification.

Same architecture and weights (bertpipe's copied into transformers' by key: the names agree), the same SST-2
batches (the project's WordPiece tokenizer, each batch padded to its longest sentence) and the same loop:
forward, cross-entropy, backward, AdamW step. The two models alternate step by step, so noise on a shared
machine hits both alike; examples/s comes from the median step time.

    .venv/bin/python bench/finetune.py                      # mini, batch 32, on the CPU
    .venv/bin/python bench/finetune.py --preset base --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.hf_interop import hf_config
from pipeline.model import PRESETS, BertModel, autocast, from_preset
from recipes.bert import BertSequenceClassifier
from recipes.tasks import TASKS, Collator, WordPieceEncoder, encode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, ensure_wiki_vocab, table  # noqa: E402


def batches(vocab: Path, count: int, batch_size: int, max_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of SST-2 training sentences in a seeded random order (so lengths vary as in training)."""
    examples = TASKS["sst2"].read(data_dir() / "finetune" / "sst2" / "train.tsv")
    random.Random(seed).shuffle(examples)
    encoder = WordPieceEncoder(vocab)
    features = encode(examples[:count * batch_size], encoder, max_len)
    collate = Collator(encoder.pad_id)
    return [collate(features[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def models(preset: str, vocab_size: int, device: str) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """bertpipe's classifier and transformers' with the same weights, and their largest logit difference."""
    import transformers

    torch.manual_seed(0)
    ours = BertSequenceClassifier(BertModel(from_preset(preset, vocab_size)), num_labels=2)
    config = transformers.BertConfig(**hf_config(ours.bert.config), num_labels=2)
    theirs = transformers.BertForSequenceClassification(config)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
    x = torch.randint(5, vocab_size, (4, 32), device=device)
    mask = torch.ones_like(x)
    with torch.no_grad():
        diff = (ours(x, mask, torch.zeros_like(x)) - theirs(input_ids=x, attention_mask=mask).logits).abs().max()
    return ours.train(), theirs.train(), float(diff)


def step_fn(model: torch.nn.Module, hf: bool, device: str, precision: str):
    """One optimizer step on a batch; returns its seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=device == "cuda")

    def step(batch: dict[str, torch.Tensor]) -> float:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, precision):
            if hf:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits
            else:
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        F.cross_entropy(logits.float(), batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128, help="pieces per sentence at most (SST-2's are short)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--vocab", type=Path, help="vocab directory (default: build/vocab/wiki, built if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    vocab = args.vocab or ensure_wiki_vocab()
    data = batches(vocab, args.warmup + args.steps, args.batch_size, args.max_len, args.seed)
    ours, theirs, diff = models(args.preset, WordPieceEncoder(vocab).vocab_size, args.device)
    runs = {"bertpipe BertSequenceClassifier": step_fn(ours, False, args.device, args.precision),
            "transformers BertForSequenceClassification": step_fn(theirs, True, args.device, args.precision)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i, batch in enumerate(data):
        for name, step in runs.items():  # alternate, so both see the same machine state
            seconds = step(batch)
            if i >= args.warmup:
                times[name].append(seconds)

    tokens = sum(int(b["attention_mask"].sum()) for b in data[args.warmup:]) / args.steps
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}, batch {args.batch_size}, {tokens / args.batch_size:.1f} real tokens a sentence on average, "
          f"{args.precision}, {where}; max logit difference at the same weights {diff:.1e}")
    rows, rates = [], {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rates[name] = args.batch_size / median
        rows.append({"model": name, "ms/step": f"{1000 * median:.1f}", "examples/s": f"{rates[name]:.1f}"})
    print(table(rows, ["model", "ms/step", "examples/s"]))
    ours_rate, theirs_rate = rates.values()
    print(f"ratio bertpipe / transformers: {ours_rate / theirs_rate:.2f}x")


if __name__ == "__main__":
    main()
