"""`bertpipe predict`: a finished run's label with its probability for each text, or each word's tag (a squad
run's answers to questions about a passage: recipes/squad.py).

The run is rebuilt from its `model/` directory (safetensors weights, meta.json, tokenizer files) through the
model kind's `restore()`; no Lightning checkpoint and no pickled code is loaded. Texts are encoded and batched
exactly as in training (recipes/tasks.py). For tagging, free text is split into words the way CoNLL tokenizes
(punctuation apart); `--pretokenized` splits on whitespace only.
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
from recipes.tasks import Collator, TaggedExample, TextExample, encode, split_words


class Predictor:
    """A finished run, ready to label texts."""

    def __init__(self, run: str | Path, device: str = "cpu", batch_size: int = 32):
        self.module, self.encoder, self.meta = load_run(run)
        self.module.to(device)
        self.device, self.batch_size = device, batch_size
        if self.kind == "span":
            raise BertpipeError(f"{run}: a {self.meta['task']} run answers questions: give --question and --context")

    @property
    def kind(self) -> str:
        return self.module.spec.kind

    @torch.no_grad()
    def __call__(self, texts: list[str], pretokenized: bool = False) -> list[dict]:
        """One dict per text: `label`, `probability` and every label's `probabilities`; or `words`, `tags` and
        the probability of each tag."""
        labels = self.module.spec.labels
        if self.kind == "classify":
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
                if self.kind == "classify":
                    p = probs[i].tolist()
                    out.append({"text": ex.text, "label": labels[int(preds[i])], "probability": round(p[preds[i]], 4),
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
    """`label<TAB>probability<TAB>text`, or `word/TAG word/TAG ...`."""
    if "label" in result:
        return f"{result['label']}\t{result['probability']:.4f}\t{result['text']}"
    return " ".join(f"{w}/{t}" for w, t in zip(result["words"], result["tags"], strict=True))


def _read_inputs(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BertpipeError(f"{path}: cannot read: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def predict_command(argv: list[str]) -> int:
    from pipeline.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="bertpipe predict",
        description="Label texts with a finished finetune run: the label and its probability for sentiment "
                    "tasks, each word's tag for NER and POS. One output line per input text. A squad run "
                    "answers --question about --context instead: answer<TAB>score<TAB>probability<TAB>question "
                    "(the score is the start plus the end logit, the probability its share of the n-best).")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished `bertpipe finetune` run directory")
    parser.add_argument("--input", metavar="FILE", help="also label each non-empty line of FILE ('-' for stdin)")
    parser.add_argument("--json", action="store_true", help="one JSON object a line, with every probability")
    parser.add_argument("--pretokenized", action="store_true", help="tagging: words are split on whitespace only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    qa = parser.add_argument_group("span QA (a squad run)")
    qa.add_argument("--question", action="append", help="a question about the passage (repeat for several)")
    passage = qa.add_mutually_exclusive_group()
    passage.add_argument("--context", help="the passage the answer is cut from")
    passage.add_argument("--context-file", metavar="FILE", help="the passage, read from FILE ('-' for stdin)")
    qa.add_argument("--n-best", type=int, help="candidates kept per question (default: the run's task.n_best)")
    args = parser.parse_args(argv)
    setup_logging(quiet=True)
    if args.question or args.context or args.context_file:
        from recipes.squad import answer_command

        return answer_command(args)
    texts = [t for t in args.texts if t.strip()] + (_read_inputs(args.input) if args.input else [])
    if not texts:
        raise BertpipeError("nothing to label: give texts or --input FILE")
    for result in Predictor(args.run, args.device, args.batch_size)(texts, args.pretokenized):
        print(json.dumps(result, ensure_ascii=False) if args.json else format_line(result))
    return 0

