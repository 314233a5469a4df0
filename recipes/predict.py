"""`bertpipe predict`: a finished run's label with its probability for each text or sentence pair, a pair's
score (STS-B), or each word's tag.

The run is rebuilt from its `model/` directory (safetensors weights, meta.json, tokenizer files) through the
model kind's `restore()`; no Lightning checkpoint and no pickled code is loaded. Texts are encoded and batched
exactly as in training (recipes/tasks/). For tagging, free text is split into words the way CoNLL tokenizes
(punctuation apart); `--pretokenized` splits on whitespace only. A pair task reads pairs: `--pair A B`, or an
input file of `A<TAB>B` lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.errors import BertpipeError
from recipes.base import load_run
from recipes.tasks import Collator, TaggedExample, TextExample, TextPairExample, encode, split_words


class Predictor:
    """A finished run, ready to label texts."""

    def __init__(self, run: str | Path, device: str = "cpu", batch_size: int = 32):
        self.module, self.encoder, self.meta = load_run(run)
        self.module.to(device)
        self.device, self.batch_size = device, batch_size

    @property
    def kind(self) -> str:
        return self.module.spec.kind

    @property
    def pair(self) -> bool:
        return self.module.spec.pair

    @torch.no_grad()
    def __call__(self, texts: list[str] | list[tuple[str, str]], pretokenized: bool = False) -> list[dict]:
        """One dict per text (or `(a, b)` pair for a pair task): `label`, `probability` and every label's
        `probabilities`; a `score`; or `words`, `tags` and the probability of each tag."""
        labels = self.module.spec.labels
        if self.pair:
            examples = [TextPairExample(a, b, 0) for a, b in texts]
        elif self.kind in ("classify", "regress"):
            examples = [TextExample(t, 0) for t in texts]
        else:
            words = [t.split() if pretokenized else split_words(t) for t in texts]
            examples = [TaggedExample(w, [0] * len(w)) for w in words]
        features = encode(examples, self.encoder, self.meta["max_len"])
        loader = DataLoader(features, batch_size=self.batch_size, collate_fn=Collator(self.encoder.pad_id))
        out: list[dict] = []
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.module(batch)
            probs = logits.float().softmax(-1)
            preds = self.module.predictions(logits, batch)
            for i in range(len(preds)):
                ex = examples[len(out)]
                text = {"text_a": ex.text_a, "text_b": ex.text_b} if self.pair else {"text": texts[len(out)]}
                if self.kind == "regress":
                    out.append(text | {"score": round(float(preds[i]), 4)})
                elif self.kind == "classify":
                    p = probs[i].tolist()
                    out.append(text | {"label": labels[int(preds[i])], "probability": round(p[preds[i]], 4),
                                       "probabilities": {name: round(v, 4) for name, v in zip(labels, p, strict=True)}})
                else:
                    n = len(ex.words)
                    tags = preds[i, :n].tolist()
                    chosen = probs[i, :n].gather(-1, preds[i, :n, None]).squeeze(-1).tolist() if n else []
                    # words cut off by max_len have no logits of their own: their default tag has no probability
                    cut = (batch["word_starts"][i, :n] < 0).tolist()
                    probabilities = [None if c else round(p, 4) for p, c in zip(chosen, cut, strict=True)]
                    out.append({"text": texts[len(out)], "words": ex.words, "tags": [labels[t] for t in tags],
                                "probabilities": probabilities})
        return out


def format_line(result: dict) -> str:
    """`label<TAB>probability<TAB>text`, `score<TAB>text` (a pair: `text_a<TAB>text_b`), or `word/TAG ...`."""
    text = f"{result['text_a']}\t{result['text_b']}" if "text_a" in result else result.get("text")
    if "score" in result:
        return f"{result['score']:.4f}\t{text}"
    if "label" in result:
        return f"{result['label']}\t{result['probability']:.4f}\t{text}"
    return " ".join(f"{w}/{t}" for w, t in zip(result["words"], result["tags"], strict=True))


def _read_inputs(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BertpipeError(f"{path}: cannot read: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_pairs(path: str) -> list[tuple[str, str]]:
    """Non-empty lines `sentence a<TAB>sentence b`; any other line stops with the file and line."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BertpipeError(f"{path}: cannot read: {err}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise BertpipeError(f"{path}:{number}: expected two tab-separated sentences, found {len(fields)} field(s)")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def predict_command(argv: list[str]) -> int:
    from pipeline.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="bertpipe predict",
        description="Label texts with a finished finetune run: the label and its probability for sentiment "
                    "and CoLA, for a sentence pair's label (MRPC, RTE, WNLI), the pair's score for STS-B, each "
                    "word's tag for NER and POS. One output line per input text or pair.")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished `bertpipe finetune` run directory")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="a sentence pair, for a pair task (repeatable)")
    parser.add_argument("--input", metavar="FILE", help="also label each non-empty line of FILE ('-' for stdin); "
                        "for a pair task each line is `sentence a<TAB>sentence b`")
    parser.add_argument("--json", action="store_true", help="one JSON object a line, with every probability")
    parser.add_argument("--pretokenized", action="store_true", help="tagging: words are split on whitespace only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    setup_logging(quiet=True)
    texts = [t for t in args.texts if t.strip()]
    if not texts and not args.pair and not args.input:
        raise BertpipeError("nothing to label: give texts, --pair A B or --input FILE")
    predictor = Predictor(args.run, args.device, args.batch_size)
    task = predictor.module.spec.name
    if predictor.pair:
        if texts:
            raise BertpipeError(f"task {task} labels sentence pairs: give --pair A B or --input FILE of A<TAB>B lines")
        texts = [tuple(p) for p in args.pair] + (_read_pairs(args.input) if args.input else [])
    elif args.pair:
        raise BertpipeError(f"task {task} labels single texts, not pairs: give the texts without --pair")
    else:
        texts += _read_inputs(args.input) if args.input else []
    if not texts:
        raise BertpipeError(f"nothing to label in {args.input}")
    for result in predictor(texts, args.pretokenized):
        print(json.dumps(result, ensure_ascii=False) if args.json else format_line(result))
    return 0

