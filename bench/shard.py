"""Shard stage benchmark: raw text to finished seq-128 shards, beside raw `tokenizers` encoding of the text.

For each corpus size (10 MB and the whole ~100 MB Wikipedia sample) it runs, each in a fresh child process:
the raw encoding baseline (`Tokenizer.encode_batch` over the documents' paragraphs, one thread), then
`bertpipe shard` with 1 and 2 workers. It prints MB/s, instances/s (also per core), peak RSS (the largest
single process) and the ratios to quote: stage time / raw encoding time and 2 workers / 1 worker.

    .venv/bin/python bench/shard.py                  # builds build/vocab/wiki first if it is missing
    .venv/bin/python bench/shard.py --sizes 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, ensure_wiki_vocab, run_child, table  # noqa: E402


def peak_rss_mb() -> float:
    """The largest resident set of this process or any worker it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def child(kind: str, files: list[str], vocab: str, workers: int = 1) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from pipeline.corpus import Corpus, CorpusConfig, CorpusInput

    corpus = CorpusConfig(inputs=[CorpusInput(path=f, format="wikiextractor") for f in files])
    if kind == "encode":
        from tokenization import load_tokenizer

        tok = load_tokenizer(vocab)
        paragraphs = [p for d in Corpus(corpus).documents() for p in d.text.split("\n")]
        start = time.perf_counter()
        tok.encode_batch(paragraphs, add_special_tokens=False)
        return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "instances": 0}
    from pipeline.shard import ShardConfig, build_shards
    from pipeline.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ShardConfig(corpus=corpus, vocab_dir=vocab, output_dir=f"{tmp}/shards", workers=workers)
        start = time.perf_counter()
        build_shards(cfg)
        seconds = time.perf_counter() - start
        rows = Store(f"{tmp}/shards").read_json("manifest.json")["rows"]
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "instances": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100", help="corpus sizes in files of ~1 MB (comma-separated)")
    parser.add_argument("--vocab", help="a vocab directory (default: build/vocab/wiki, built if missing)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], **json.loads(args.child[1]))))
        return
    args.vocab = args.vocab or str(ensure_wiki_vocab())
    every = sorted(str(p) for p in (data_dir() / "pretrain" / "wikipedia" / "AA").glob("wiki_*"))
    for size in (int(s) for s in args.sizes.split(",")):
        files = every[:size]
        mb = sum(Path(f).stat().st_size for f in files) / 1e6
        rows, by = [], {}
        for kind, workers in (("encode", 1), ("shard", 1), ("shard", 2)):
            r = run_child(Path(__file__), kind, json.dumps({"files": files, "vocab": args.vocab, "workers": workers}))
            name = "raw encode_batch" if kind == "encode" else f"bertpipe shard, {workers} worker(s)"
            by[(kind, workers)] = r
            rows.append({"run": name, "seconds": f"{r['seconds']:.1f}", "MB/s": f"{mb / r['seconds']:.2f}",
                         "instances": r["instances"] or "",
                         "inst/s/core": f"{r['instances'] / r['seconds'] / workers:.0f}" if r["instances"] else "",
                         "peak RSS MB": f"{r['peak_rss_mb']:.0f}"})
        print(f"\nshard benchmark: {len(files)} files, {mb:.1f} MB, seq 128")
        print(table(rows, ["run", "seconds", "MB/s", "instances", "inst/s/core", "peak RSS MB"]))
        enc, one, two = by[("encode", 1)]["seconds"], by[("shard", 1)]["seconds"], by[("shard", 2)]["seconds"]
        print(f"stage (1 worker) / raw encoding: {one / enc:.2f}x (goal <= 1.3x); "
              f"2 workers speed-up: {one / two:.2f}x (goal >= 1.8x)")


if __name__ == "__main__":
    main()
