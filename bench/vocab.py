"""Vocab stage benchmark: `bertpipe vocab` against HF tokenizers' own trainer on the same files.

The baseline is the raw Rust trainer reading the files itself (`Tokenizer.train(files)`, same normalizer,
pre-tokenizer and trainer settings). Each side runs in its own child process, one after the other, so the
peak RSS is its own; the ratio is what to quote, since absolute times vary from machine to machine.

    .venv/bin/python bench/vocab.py                      # the whole Wikipedia sample, 30k vocabulary
    .venv/bin/python bench/vocab.py --files 10 --vocab-size 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, peak_rss_mb, run_child, table  # noqa: E402


def child(kind: str, files: list[str], vocab_size: int) -> dict:
    from tokenizers import trainers

    from tokenization.wordpiece import SPECIAL_TOKENS, _empty_tokenizer

    start = time.perf_counter()
    if kind == "tokenizers":
        tok = _empty_tokenizer(lowercase=True, strip_accents=None)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, limit_alphabet=1000,
                                            special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                            show_progress=False)
        tok.train(files, trainer=trainer)
        size = tok.get_vocab_size()
    else:
        from pipeline.config import load_config
        from pipeline.vocab import VocabConfig, build_vocab

        inputs = ",".join(f"{{path: '{f}', format: wikiextractor}}" for f in files)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(VocabConfig, None, [f"corpus.inputs=[{inputs}]", f"output_dir={tmp}/v",
                                                  f"vocab_size={vocab_size}"])
            out = build_vocab(cfg)
            size = len((out / "vocab.txt").read_text().splitlines())
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "vocab": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=0, help="use only the first N Wikipedia files (0: all)")
    parser.add_argument("--vocab-size", type=int, default=30_000)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, payload = args.child
        print(json.dumps(child(kind, **json.loads(payload))))
        return

    files = sorted(str(p) for p in (data_dir() / "pretrain" / "wikipedia" / "AA").glob("wiki_*"))
    files = files[: args.files] if args.files else files
    megabytes = sum(Path(f).stat().st_size for f in files) / 1e6
    payload = json.dumps({"files": files, "vocab_size": args.vocab_size})
    rows = []
    for kind in ("tokenizers", "bertpipe"):
        result = run_child(Path(__file__), kind, payload)
        rows.append({"run": kind, "seconds": f"{result['seconds']:.1f}", "MB/s": f"{megabytes / result['seconds']:.2f}",
                     "peak RSS MB": f"{result['peak_rss_mb']:.0f}", "vocab": result["vocab"],
                     "_s": result["seconds"]})
    print(f"vocab benchmark: {len(files)} files, {megabytes:.1f} MB, vocab {args.vocab_size}")
    print(table(rows, ["run", "seconds", "MB/s", "peak RSS MB", "vocab"]))
    print(f"ratio bertpipe / tokenizers time: {rows[1]['_s'] / rows[0]['_s']:.2f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
