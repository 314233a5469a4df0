"""`bertpipe predict` (and `bertpipe serve`): a finished run's answer for each input — a label with its
probability (of a text or a sentence pair), a pair's score (STS-B), each word's tag, a translation, or the
span of a passage that answers a question (SQuAD).

The run is rebuilt from its `model/` directory (safetensors weights, meta.json, tokenizer files) through the
model kind's `restore()`; no Lightning checkpoint and no pickled code is loaded. Inputs are encoded and batched
exactly as in training (recipes/tasks/). For tagging, free text is split into words the way CoNLL tokenizes
(punctuation apart); `--pretokenized` splits on whitespace only.

What each task kind does with an input lives here once, in one `KindPredictor` subclass per kind (`KINDS`):
`prepare()` checks one input and turns it into what the network reads, `answer()` runs a batch of prepared
inputs. `bertpipe predict` calls both in turn; the server prepares each request's inputs as it arrives (a bad
one is that request's 4xx) and answers batches gathered across requests. An input is one of the `SHAPES`: a
text, a pair `{"a": ..., "b": ...}` or a question with its context; each kind says which one it takes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import BertpipeError
from recipes.base import TaskModule, load_net
from recipes.tasks import Collator, TaggedExample, TaskSpec, TextPairExample, encode, encode_text, get_task, split_words

# the shapes one input can take: what `prepare` accepts, the server's schema and the page's fields
SHAPES = {"text": "a text", "pair": 'a pair {"a": ..., "b": ...}',
          "question": 'a question with its context {"question": ..., "context": ...}'}


class InputError(BertpipeError):
    """An input a run cannot answer: `reason` says why, `index` which input (the server answers with a 422)."""

    def __init__(self, reason: str, index: int | None = None):
        super().__init__(reason if index is None else f"input {index}: {reason}")
        self.reason, self.index = reason, index


def shape_of(item: Any) -> str | None:
    """The SHAPES key of one input (a str, or a dict with exactly the shape's keys), None for anything else."""
    if isinstance(item, str):
        return "text"
    if isinstance(item, dict):
        return {frozenset("ab"): "pair", frozenset(("question", "context")): "question"}.get(frozenset(item))
    return None


class KindPredictor:
    """How one task kind answers: `prepare` checks one input, `answer` runs a batch of prepared ones.

    A subclass sets `shape` (the SHAPES key it takes) and returns one JSON-ready dict per input from `answer`,
    each with `truncated`: whether the input was cut to the run's `max_len`.
    """

    shape = "text"

    def __init__(self, net: torch.nn.Module, encoder, meta: dict, spec: TaskSpec, device: str, **options: Any):
        self.net, self.encoder, self.meta, self.spec, self.device = net.to(device), encoder, meta, spec, device
        self.max_len = meta["max_len"]

    def prepare(self, item: Any, pretokenized: bool = False) -> Any:
        shape = shape_of(item)
        if shape != self.shape:
            got = SHAPES[shape] if shape else f"a {type(item).__name__}"
            raise InputError(f"this {self.spec.name} run takes {SHAPES[self.shape]}, not {got}")
        if shape == "text":
            if not item.strip():
                raise InputError("empty text")
            return item.strip()
        for key, value in item.items():
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{key!r} must be a non-empty text")
        return {key: value.strip() for key, value in item.items()}

    def answer(self, prepared: list) -> list[dict]:
        raise NotImplementedError

    def fits(self, pieces: list[int], encoder=None) -> bool:
        """Whether a text's pieces fit in max_len beside the special tokens (else the model saw them cut)."""
        encoder = encoder or self.encoder
        return len(pieces) <= self.max_len - len(encoder.prefix) - len(encoder.suffix)


class LabelPredictor(KindPredictor):
    """A kind whose network gives logits per sequence or per word: TaskModule's forward and predictions."""

    def __init__(self, net, encoder, meta, spec, device, **options):
        super().__init__(net, encoder, meta, spec, device)
        self.module = TaskModule(self.net, spec).eval()

    def batch(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in Collator(self.encoder.pad_id)(features).items()}


class Sequence(LabelPredictor):
    """One answer per text, or per sentence pair on a pair task (`[CLS] a [SEP] b [SEP]`, as in training)."""

    def __init__(self, net, encoder, meta, spec, device, **options):
        super().__init__(net, encoder, meta, spec, device)
        self.shape = "pair" if spec.pair else "text"

    def answer(self, prepared: list) -> list[dict]:
        if self.shape == "pair":
            features = encode([TextPairExample(p["a"], p["b"], 0) for p in prepared], self.encoder, self.max_len)
            pieces = self.encoder.pieces([t for p in prepared for t in (p["a"], p["b"])])
            room = self.max_len - len(self.encoder.prefix) - 2 * len(self.encoder.suffix)
            cut = [len(a) + len(b) > room for a, b in zip(pieces[0::2], pieces[1::2], strict=True)]
            echoes = [{"text_a": p["a"], "text_b": p["b"]} for p in prepared]
        else:
            pieces = self.encoder.pieces(prepared)
            features = [{"input_ids": encode_text(self.encoder, p, self.max_len), "label": 0} for p in pieces]
            cut = [not self.fits(p) for p in pieces]
            echoes = [{"text": text} for text in prepared]
        batch = self.batch(features)
        logits = self.module(batch)
        return [echo | self.result(row, pred) | {"truncated": c}
                for echo, row, pred, c in zip(echoes, logits.float(), self.module.predictions(logits, batch), cut,
                                              strict=True)]

    def result(self, logits: torch.Tensor, prediction: torch.Tensor) -> dict:
        raise NotImplementedError


class Classify(Sequence):
    """One label per text or pair: the label, its probability and every label's."""

    def result(self, logits: torch.Tensor, prediction: torch.Tensor) -> dict:
        labels, probs, pred = self.spec.labels, logits.softmax(-1).tolist(), int(prediction)
        return {"label": labels[pred], "probability": round(probs[pred], 4),
                "probabilities": {name: round(v, 4) for name, v in zip(labels, probs, strict=True)}}


class Regress(Sequence):
    """One score per text or pair (STS-B's similarity, on the scale the run was trained on)."""

    def result(self, logits: torch.Tensor, prediction: torch.Tensor) -> dict:
        return {"score": round(float(prediction.reshape(-1)[0]), 4)}


class Tag(LabelPredictor):
    """One tag per word, with its probability; words cut off by max_len get the task's default tag."""

    def prepare(self, item: Any, pretokenized: bool = False) -> tuple[str, list[str]]:
        text = super().prepare(item)
        words = text.split() if pretokenized else split_words(text)
        if not words:
            raise InputError("no words to tag")
        return text, words

    def answer(self, prepared: list[tuple[str, list[str]]]) -> list[dict]:
        features = encode([TaggedExample(words, [0] * len(words)) for _, words in prepared], self.encoder,
                          self.max_len)
        batch = self.batch(features)
        logits = self.module(batch)
        probs, preds = logits.float().softmax(-1), self.module.predictions(logits, batch)
        out = []
        for i, (text, words) in enumerate(prepared):
            n = len(words)
            tags = preds[i, :n]
            chosen = probs[i, :n].gather(-1, tags[:, None]).squeeze(-1).tolist()
            # words cut off by max_len have no logits of their own: their default tag has no probability
            cut = [start < 0 for start in features[i]["word_starts"]]
            out.append({"text": text, "words": words, "tags": [self.spec.labels[t] for t in tags.tolist()],
                        "probabilities": [None if c else round(p, 4) for p, c in zip(chosen, cut, strict=True)],
                        "truncated": any(cut)})
        return out


class Translate(KindPredictor):
    """A translation per text: beam search (or greedy, beam 1) with the run's settings unless given."""

    def __init__(self, net, encoder, meta, spec, device, beam: int | None = None, max_new_tokens: int | None = None,
                 **options):
        super().__init__(net, encoder, meta, spec, device)
        if (beam is not None and beam < 1) or (max_new_tokens is not None and max_new_tokens < 1):
            raise BertpipeError("the beam size and the translation length limit must be positive")
        self.beam, self.max_new_tokens = beam or net.cfg.beam, max_new_tokens

    def answer(self, texts: list[str]) -> list[dict]:
        from recipes.seq2seq import PairCollator, decode_ids

        source, target = self.encoder.source, self.encoder.target
        bos, eos = target.prefix[0], target.suffix[0]
        pieces = source.pieces(texts)
        batch = PairCollator(source.pad_id, target.pad_id)(
            [{"source": encode_text(source, p, self.max_len), "target": [bos], "index": 0} for p in pieces])
        args = (batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device), bos, eos)
        with torch.no_grad():
            ids = (self.net.greedy(*args, max_new_tokens=self.max_new_tokens) if self.beam == 1 else
                   self.net.beam_search(*args, beam=self.beam, max_new_tokens=self.max_new_tokens))
        return [{"text": text, "translation": decode_ids(target, row), "truncated": not self.fits(piece, source)}
                for text, piece, row in zip(texts, pieces, ids, strict=True)]


class Span(KindPredictor):
    """The span of the context that answers each question (SQuAD): the run's windows by doc stride, the n-best
    (start, end) pairs of each, the best over the windows; the answer `text`, its `score` (start plus end logit;
    null when no span fits), `probability` among the n-best, character `start`/`end` in the context as given,
    the `n_best` list and how many `windows` the context took. `truncated`: the question was cut to the run's
    max_query_len (contexts are never cut, only windowed)."""

    shape = "question"

    def __init__(self, net, encoder, meta, spec, device, n_best: int | None = None, **options):
        from recipes.base import TrainerConfig
        from recipes.squad import SpanModule, SpanSettings

        super().__init__(net, encoder, meta, spec, device)
        if n_best is not None and n_best < 1:
            raise BertpipeError("--n-best must be positive")
        self.settings = SpanSettings(meta["max_len"], meta["doc_stride"], meta["max_query_len"],
                                     meta["max_answer_len"], n_best or meta["n_best"]).check()
        self.module = SpanModule(self.net, spec, TrainerConfig(), self.settings).eval()

    def prepare(self, item: Any, pretokenized: bool = False) -> dict:
        question = super().prepare(item)["question"]
        return {"question": question, "context": item["context"]}  # unstripped: answers are offsets into it

    def answer(self, prepared: list[dict]) -> list[dict]:
        from recipes.squad import Answers, SpanCollator, SquadExample, build_windows

        examples = [SquadExample(str(i), "", p["context"], p["question"], [], []) for i, p in enumerate(prepared)]
        features = build_windows(examples, self.encoder, self.settings)
        batch = {k: v.to(self.device) for k, v in SpanCollator(self.encoder.pad_id)(features).items()}
        answers = Answers(self.settings.n_best)
        answers.add(features, *self.module.spans(self.module(batch), batch))
        cut = [len(p) > self.settings.max_query_len for p in self.encoder.pieces([ex.question for ex in examples])]
        out = []
        for ex, truncated in zip(examples, cut, strict=True):
            ranked = [c | {"score": c["score"] if math.isfinite(c["score"]) else None}
                      for c in answers.n_best_list(ex.id)]
            out.append({"question": ex.question, **ranked[0], "n_best": ranked,
                        "windows": sum(1 for f in features if f["example"] is ex), "truncated": truncated})
        return out


KINDS: dict[str, type[KindPredictor]] = {"classify": Classify, "regress": Regress, "tag": Tag,  # task kind ->
                                         "translate": Translate, "span": Span}
NOT_SERVED = {"rnn_lm": "writes sentences (bertpipe generate)", "autoencoder": "rebuilds its inputs"}  # model kinds


class Predictor:
    """A finished run, ready to answer inputs of its task kind (KINDS) in batches of `batch_size`."""

    def __init__(self, run: str | Path, device: str = "cpu", batch_size: int = 32, **options: Any):
        net, encoder, self.meta = load_net(run)
        self.spec = get_task(self.meta["task"])
        model_kind = self.meta["kind"]
        if model_kind in NOT_SERVED or self.spec.kind not in KINDS:
            why = NOT_SERVED.get(model_kind, f"is a {self.spec.kind} task")
            raise BertpipeError(f"{run}: a {model_kind} run on {self.spec.name} {why}; predict answers "
                                f"{', '.join(KINDS)} runs")
        self.impl = KINDS[self.spec.kind](net, encoder, self.meta, self.spec, device, **options)
        self.device, self.batch_size = device, batch_size

    @property
    def kind(self) -> str:
        """The task kind: classify, regress, tag, translate, span (a key of KINDS)."""
        return self.spec.kind

    @property
    def shape(self) -> str:
        """The input it takes (a key of SHAPES)."""
        return self.impl.shape

    def prepare(self, inputs: list, pretokenized: bool = False) -> list:
        """Every input checked and converted; the first bad one raises InputError naming its index."""
        prepared = []
        for i, item in enumerate(inputs):
            try:
                prepared.append(self.impl.prepare(item, pretokenized))
            except InputError as err:
                raise InputError(err.reason, i) from None
        return prepared

    @torch.no_grad()
    def answer(self, prepared: list) -> list[dict]:
        """One result per prepared input, in order (see the KindPredictor subclasses for the keys)."""
        out: list[dict] = []
        for start in range(0, len(prepared), self.batch_size):
            out += self.impl.answer(prepared[start:start + self.batch_size])
        return out

    def __call__(self, inputs: list, pretokenized: bool = False) -> list[dict]:
        return self.answer(self.prepare(inputs, pretokenized))


def format_line(result: dict) -> str:
    """`label<TAB>probability<TAB>text`, `score<TAB>text` (a pair: `text_a<TAB>text_b`), `word/TAG ...`, the
    translation, or `answer<TAB>score<TAB>probability<TAB>question`."""
    if "question" in result:  # a span: answer<TAB>score<TAB>probability<TAB>question
        score = result["score"] if result["score"] is not None else -math.inf
        return f"{result['text']}\t{score:.4f}\t{result['probability']:.4f}\t{result['question']}"
    text = f"{result['text_a']}\t{result['text_b']}" if "text_a" in result else result.get("text")
    if "score" in result:
        return f"{result['score']:.4f}\t{text}"
    if "label" in result:
        return f"{result['label']}\t{result['probability']:.4f}\t{text}"
    if "translation" in result:
        return result["translation"]
    return " ".join(f"{w}/{t}" for w, t in zip(result["words"], result["tags"], strict=True))


def _read_inputs(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BertpipeError(f"{path}: cannot read: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_pairs(path: str) -> list[dict]:
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
        pairs.append({"a": fields[0], "b": fields[1]})
    return pairs


def _questions(args: argparse.Namespace, texts: list, span: bool, task: str) -> list[dict]:
    """A span run's inputs: each --question about the one passage (--context or --context-file)."""
    if not span:
        raise BertpipeError(f"{args.run}: a {task} run answers questions: give --question and --context")
    if texts or args.input or args.pair:
        raise BertpipeError("--question takes no texts to label: give the passage with --context or --context-file")
    if args.context_file:
        try:
            context = sys.stdin.read() if args.context_file == "-" else Path(args.context_file).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BertpipeError(f"{args.context_file}: cannot read: {err}") from None
    else:
        context = args.context or ""
    if not args.question or not context.strip():
        raise BertpipeError("span QA needs --question and a passage (--context TEXT or --context-file FILE)")
    return [{"question": q, "context": context} for q in args.question]


def predict_command(argv: list[str]) -> int:
    from pipeline.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="bertpipe predict",
        description="Answer texts with a finished finetune run: the label and its probability for sentiment "
                    "and CoLA, a sentence pair's label (MRPC, RTE, WNLI), a pair's score (STS-B), each word's "
                    "tag for NER and POS, the translation for seq2seq runs. One output line per input text or "
                    "pair. A squad run answers --question about --context instead: "
                    "answer<TAB>score<TAB>probability<TAB>question (the score is the start plus the end logit, the "
                    "probability its share of the n-best).")
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
    qa = parser.add_argument_group("span QA (a squad run)")
    qa.add_argument("--question", action="append", help="a question about the passage (repeat for several)")
    passage = qa.add_mutually_exclusive_group()
    passage.add_argument("--context", help="the passage the answer is cut from")
    passage.add_argument("--context-file", metavar="FILE", help="the passage, read from FILE ('-' for stdin)")
    qa.add_argument("--n-best", type=int, help="candidates kept per question (default: the run's task.n_best)")
    args = parser.parse_args(argv)
    setup_logging(quiet=True)
    texts: list = [t for t in args.texts if t.strip()]
    span = bool(args.question or args.context is not None or args.context_file)
    if not span and not texts and not args.pair and not args.input:
        raise BertpipeError("nothing to label: give texts, --pair A B, --input FILE, or --question and --context")
    predictor = Predictor(args.run, args.device, args.batch_size, n_best=args.n_best)
    task = predictor.spec.name
    if predictor.shape == "question":
        texts = _questions(args, texts, span, task)
    elif span:
        raise BertpipeError(f"{args.run}: a {task} run answers no questions (--question needs a squad run); give "
                            "texts to label instead")
    elif predictor.shape == "pair":
        if texts:
            raise BertpipeError(f"task {task} labels sentence pairs: give --pair A B or --input FILE of A<TAB>B lines")
        texts = [{"a": a, "b": b} for a, b in args.pair] + (_read_pairs(args.input) if args.input else [])
    elif args.pair:
        raise BertpipeError(f"task {task} labels single texts, not pairs: give the texts without --pair")
    else:
        texts += _read_inputs(args.input) if args.input else []
    if not texts:
        raise BertpipeError(f"nothing to label in {args.input}")
    for result in predictor(texts, args.pretokenized):
        print(json.dumps(result, ensure_ascii=False) if args.json else format_line(result))
    return 0
