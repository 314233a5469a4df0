"""GLUE's sentence pairs: bertpipe's pair encoding against transformers' tokenizer call in run_glue.py, and a
training step of the InferSent-style pair BiLSTM against the same BiLSTM on each side run as two batches.

1. Encoding: every training pair of MRPC, RTE, STS-B and WNLI (12,541 pairs), max_len 128. bertpipe:
   `encode()` (tokenizers' `encode_batch` of every sentence, then longest-first truncation in Python);
   transformers: `BertTokenizerFast(a, b, truncation=True, max_length=128)`, what run_glue.py calls. The ids
   and token types are the same (tests/test_glue.py checks it); the benchmark says what the Python half costs.
2. The pair BiLSTM (recipes/rnn.py `PairNet`): forward, MSE, backward and AdamW on STS-B batches, with both
   sides of every pair stacked into one batch of 2B sentences (what PairNet does) against a baseline that runs
   the same encoder once per side; the two alternate step by step, examples/s from the median step time.

    .venv/bin/python bench/glue.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recipes.base import RnnConfig
from recipes.rnn import PairNet, _segments
from recipes.tasks import TASKS, Collator, WordPieceEncoder, encode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, ensure_wiki_vocab, table  # noqa: E402

FILES = {"mrpc": "glue/MRPC", "rte": "glue/RTE", "stsb": "glue/STS-B", "wnli": "glue/WNLI"}


def pairs() -> list:
    return [ex for task, d in FILES.items() for ex in TASKS[task].read(data_dir() / "finetune" / d / "train.tsv")]


def bench_encoding(vocab: Path, repeats: int) -> list[dict]:
    from transformers import BertTokenizerFast

    examples = pairs()
    encoder = WordPieceEncoder(vocab)
    hf = BertTokenizerFast.from_pretrained(str(vocab))
    a, b = [ex.text_a for ex in examples], [ex.text_b for ex in examples]
    times = {"bertpipe encode": [], "transformers run_glue call": []}
    for _ in range(repeats):
        start = time.perf_counter()
        encode(examples, encoder, 128)
        times["bertpipe encode"].append(time.perf_counter() - start)
        start = time.perf_counter()
        hf(a, b, truncation=True, max_length=128)
        times["transformers run_glue call"].append(time.perf_counter() - start)
    return [{"run": name, "pairs": len(examples), "seconds": f"{statistics.median(t):.3f}",
             "pairs/s": f"{len(examples) / statistics.median(t):,.0f}"} for name, t in times.items()]


class PerSide(torch.nn.Module):
    """The baseline: PairNet's encoder run twice, once on the a's and once on the b's."""

    def __init__(self, net: PairNet):
        super().__init__()
        self.net = net

    def forward(self, input_ids, attention_mask, token_type_ids):
        n = self.net
        ids, lengths = n.segments(input_ids, attention_mask, token_type_ids)
        vectors = []
        for part, length in zip(ids.chunk(2), lengths.chunk(2), strict=True):
            out, _ = n.rnn(n.embed(part), length)
            mask = torch.arange(part.size(1))[None, :] < length[:, None]
            vectors.append(out.masked_fill(~mask[..., None], -torch.inf).max(1).values)
        u, v = vectors
        return n.classifier(torch.cat([u, v, (u - v).abs(), u * v], -1))


def bench_training(vocab: Path, steps: int, batch_size: int) -> list[dict]:
    spec = TASKS["stsb"]
    examples = spec.read(data_dir() / "finetune" / "glue/STS-B" / "train.tsv")[:steps * batch_size]
    encoder = _segments(WordPieceEncoder(vocab), spec)
    features = encode(examples, encoder, 128)
    collate = Collator(encoder.pad_id)
    batches = [collate(features[i * batch_size:(i + 1) * batch_size]) for i in range(steps)]
    torch.manual_seed(0)
    cfg = RnnConfig(cell="lstm", hidden=256, bidirectional=True, embed_dim=128, pooling="max", mlp_hidden=512)
    ours = PairNet(encoder.vocab_size, encoder.pad_id, cfg, 1)
    other = PerSide(PairNet(encoder.vocab_size, encoder.pad_id, cfg, 1))
    other.net.load_state_dict(ours.state_dict())
    models = {"PairNet (2B sentences, one pass)": ours, "the same, one pass per side": other}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for batch in batches:
        for name, model in models.items():
            start = time.perf_counter()
            pred = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).squeeze(-1)
            F.mse_loss(pred, batch["labels"]).backward()
            optims[name].step()
            optims[name].zero_grad()
            times[name].append(time.perf_counter() - start)
    return [{"run": name, "batch": batch_size, "ms/step": f"{1000 * statistics.median(t[1:]):.1f}",
             "pairs/s": f"{batch_size / statistics.median(t[1:]):.1f}"} for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=Path, help="a WordPiece vocabulary (default: build/vocab/wiki, built once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = args.vocab or ensure_wiki_vocab()
    enc = bench_encoding(vocab, args.repeats)
    print(table(enc, ["run", "pairs", "seconds", "pairs/s"]))
    ratio = float(enc[0]["seconds"]) / float(enc[1]["seconds"])
    print(f"bertpipe / transformers encoding time: {ratio:.2f}x\n")
    train = bench_training(vocab, args.steps, args.batch_size)
    print(table(train, ["run", "batch", "ms/step", "pairs/s"]))
    speedup = float(train[1]["ms/step"]) / float(train[0]["ms/step"])
    print(f"one pass over both sides / one pass per side: {speedup:.2f}x faster")


if __name__ == "__main__":
    main()
