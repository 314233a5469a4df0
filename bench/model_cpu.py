"""Training-step time on the CPU: bertpipe's BERT against transformers' BertForPreTraining.

Same config, same weights, same batch, in one process; a step is forward + backward + AdamW. transformers
projects every position onto the vocabulary and bertpipe only the ~15% masked ones: at H=256 that projection
is most of a step's work.

    .venv/bin/python bench/model_cpu.py                 # mini (L4/H256), batch 32, seq 128: ~2 minutes on 2 cores
    .venv/bin/python bench/model_cpu.py --steps 10 --preset small
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from pipeline.hf_interop import hf_config
from pipeline.model import PRESETS, BertForPreTraining, autocast, from_preset

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def masked_batch(vocab_size: int, batch: int, seq: int, masked_fraction: float, seed: int = 0) -> dict:
    """A collated batch of full-length rows ([CLS] A [SEP] B [SEP]), round(fraction x seq) tokens masked in each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    mid = seq // 2
    ids[:, 0], ids[:, mid], ids[:, -1] = CLS, SEP, SEP
    candidates = torch.tensor([i for i in range(1, seq - 1) if i != mid])
    n = round(masked_fraction * seq)
    positions = torch.stack([candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
                             for _ in range(batch)])
    labels = torch.gather(ids, 1, positions)
    ids.scatter_(1, positions, MASK)
    return {
        "input_ids": ids,
        "token_type_ids": (torch.arange(seq) > mid).long().expand(batch, -1).contiguous(),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "mlm_positions": positions,
        "mlm_labels": labels,
        "next_sentence_label": torch.randint(0, 2, (batch,), generator=g),
    }


def transformers_inputs(batch: dict) -> dict:
    """The same batch as transformers takes it: labels over the whole sequence, -100 where nothing is masked."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels.scatter_(1, batch["mlm_positions"], batch["mlm_labels"])
    keep = ("input_ids", "token_type_ids", "attention_mask", "next_sentence_label")
    return {k: batch[k] for k in keep} | {"labels": labels}


def transformers_twin(model: BertForPreTraining) -> transformers.BertForPreTraining:
    """transformers' BertForPreTraining (SDPA attention) with `model`'s config and weights."""
    config = transformers.BertConfig(**hf_config(model.config), attn_implementation="sdpa")
    twin = transformers.BertForPreTraining(config)
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).device)


def train_step(model: torch.nn.Module, batch: dict, precision: str = "fp32") -> Callable[[], torch.Tensor]:
    """One forward + backward + AdamW step on `batch` (either model's input layout), returning the loss."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> torch.Tensor:
        with autocast(device.type, precision):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], object], steps: int, warmup: int, sync: Callable[[], None] = lambda: None
               ) -> list[float]:
    """Seconds per step, after `warmup` untimed steps (allocator warm-up, compilation)."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", choices=list(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--masked", type=float, default=0.15, help="fraction of each row's tokens masked")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = BertForPreTraining(from_preset(args.preset, args.vocab_size)).train()
    twin = transformers_twin(model).train()
    batch = masked_batch(args.vocab_size, args.batch, args.seq, args.masked)
    c = model.config
    print(f"{args.preset}: L{c.num_hidden_layers}/H{c.hidden_size}/A{c.num_attention_heads}, vocab {c.vocab_size}, "
          f"batch {args.batch} x seq {args.seq}, {batch['mlm_positions'].size(1)} masked per row, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")

    with torch.no_grad():  # same weights and batch, so the same loss (dropout off for the check)
        ours = model.eval()(**batch).loss.item()
        theirs = twin.eval()(**transformers_inputs(batch)).loss.item()
    model.train(), twin.train()
    print(f"initial loss: bertpipe {ours:.5f}, transformers {theirs:.5f}")

    results = {}
    for name, step in (("bertpipe", train_step(model, batch)),
                       ("transformers", train_step(twin, transformers_inputs(batch)))):
        results[name] = statistics.median(time_steps(step, args.steps, args.warmup))
    print(f"\n{'model':<14}{'ms/step':>10}{'seq/s':>9}")
    for name, seconds in results.items():
        print(f"{name:<14}{seconds * 1e3:>10.0f}{args.batch / seconds:>9.1f}")
    print(f"\nbertpipe is {results['transformers'] / results['bertpipe']:.2f}x faster (median of {args.steps} steps; "
          "goal: at least 2x)")


if __name__ == "__main__":
    main()
