"""Collator benchmark: MLM masking of real seq-128 rows, bertpipe's collator beside transformers'
DataCollatorForLanguageModeling on the same rows, in the same process, one thread.

    .venv/bin/python bench/collate.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_wiki_shards, ensure_wiki_vocab, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="a shard directory (default: build/shards/wiki-128, built if missing)")
    parser.add_argument("--vocab", help="its vocab directory (default: build/vocab/wiki)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.shards = args.shards or str(ensure_wiki_shards())
    args.vocab = args.vocab or str(ensure_wiki_vocab())
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    from pipeline.collate import MaskingConfig, MLMCollator, continuation_flags
    from pipeline.dataset import MASKING, RowRandom, ShardSet, sample_keys
    from tokenization import load_tokenizer, special_ids

    shards = ShardSet(args.shards)
    ids, types, labels = shards.fetch(list(range(min(args.rows, shards.rows))))
    tok = load_tokenizer(args.vocab)
    ours = MLMCollator(special_ids(tok), MaskingConfig())
    lookup = MLMCollator(special_ids(tok), MaskingConfig())
    lookup.first_regular = None  # the per-id mask of a layout whose reserved ids are scattered
    wwm = MLMCollator(special_ids(tok), MaskingConfig(whole_word=True), continuation_flags(tok))
    hf = DataCollatorForLanguageModeling(BertTokenizerFast.from_pretrained(args.vocab), mlm_probability=0.15,
                                         return_tensors="pt")
    examples = [{"input_ids": i.tolist(), "token_type_ids": t.tolist()} for i, t in zip(ids, types, strict=True)]
    bs = args.batch_size
    rng = np.random.default_rng(0)
    runs = {
        "bertpipe MLMCollator": lambda s: ours(ids[s], types[s], labels[s], rng),
        "bertpipe MLMCollator (whole word)": lambda s: wwm(ids[s], types[s], labels[s], rng),
        "bertpipe MLMCollator (per-id mask lookup)": lambda s: lookup(ids[s], types[s], labels[s], rng),
        "transformers DataCollatorForLanguageModeling": lambda s: hf(examples[s]),
        # what the pretraining loader does: draws keyed per sample (its global position), not one generator
        "bertpipe MLMCollator, draws keyed per sample": lambda s: ours(
            ids[s], types[s], labels[s], RowRandom(sample_keys(1, np.arange(s.start, s.stop), MASKING))),
    }
    rows = []
    for name, fn in runs.items():
        fn(slice(0, bs))
        start = time.perf_counter()
        n = 0
        for i in range(0, len(ids) - bs + 1, bs):
            fn(slice(i, i + bs))
            n += bs
        seconds = time.perf_counter() - start
        rows.append({"collator": name, "seq/s (1 core)": f"{n / seconds:,.0f}", "_r": n / seconds})
    print(f"collate benchmark: {len(ids)} real rows, seq <= {shards.max_seq_len}, batch {bs}, one thread")
    print(table(rows, ["collator", "seq/s (1 core)"]))
    print(f"bertpipe / transformers: {rows[0]['_r'] / rows[3]['_r']:.1f}x; goal >= 50,000 seq/s per core; "
          f"mask lookup / comparison: {rows[2]['_r'] / rows[0]['_r']:.2f}x; "
          f"keyed per sample / one generator: {rows[4]['_r'] / rows[0]['_r']:.2f}x")


if __name__ == "__main__":
    main()
