"""SQuAD v1.1 span question answering (task kind "span"): BERT's windows over long contexts, n-best decoding,
EM/F1 and predictions.json; the reader is recipes/tasks/squad.py, `bertpipe predict --question` (and `serve`)
recipes/predict.py's `Span`.

Every model kind that answers (BERT's `qa_outputs` head in recipes/bert.py, the RNN reader in recipes/reader.py)
maps `[CLS] question [SEP] context window [SEP]` to a start and an end logit at every position (B, S, 2); the
data module, the Lightning module (loss, decoding, metric) and the run's predictions are here, once. fit() finds
them through the task kind (recipes/base.py's TASK_KINDS).

- Reader (recipes/tasks/squad.py): SQuAD JSON (`data` -> articles -> `paragraphs` -> `context`, `qas` -> `id`,
  `question`, `answers`). A path may select articles by index, in file order: `dev-v1.1.json#articles=0-37`
  (inclusive ranges, commas between them). Every answer must be the text at its `answer_start`; anything else
  names the article and the question id. SQuAD v2.0's unanswerable questions (`is_impossible`) are refused
  until supported.
- Windows, as HF's run_qa builds them, from the fast tokenizer's overflowing windows and character offsets: the
  question cut to `max_query_len` pieces; contexts longer than a window cut into windows of `max_len` pieces,
  consecutive windows sharing `doc_stride` context pieces (HF's meaning; google-research/bert's code steps by
  it instead); token types 0 for `[CLS] question [SEP]`, 1 for the context and the last `[SEP]`. The first gold
  answer (its surrounding whitespace stripped) is the pieces from the one its first character is in to the one
  its last character is in; a window that does not hold all of it points at `[CLS]` (position 0).
- Decoding: in each window the `n_best` (start, end) pairs inside the context with start <= end < start +
  `max_answer_len`, scored start logit + end logit (the exact top pairs, not the top starts times the top
  ends), starting at a word's first piece and ending at a word's last (no `##` piece begins an answer, none
  is cut off its word); the best over an example's windows, cut from the original context by the pieces'
  character offsets.
- Metric: torchmetrics' SQuAD, the official v1.1 script's (answers lowercased, without punctuation and
  articles, whitespace collapsed; the best over all gold answers), exact match and F1 on 0-100.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, processors
from torch.utils.data import DataLoader
from torchmetrics.functional.text import squad

from pipeline.errors import BertpipeError
from pipeline.instances import split_sentences
from recipes.base import Built, FinetuneConfig, TaskModule, TrainerConfig
from recipes.tasks import TaskDataModule, TaskSpec, WordPieceEncoder
from recipes.tasks.squad import SquadExample, parse_articles, read_squad  # noqa: F401 (re-exported)

SPAN_MODELS = ("bert", "rnn_reader")  # the model kinds whose networks give start and end logits per position


# ---- windows ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanSettings:
    """How contexts are cut into windows and spans decoded (task.* keys; saved in model/meta.json for predict)."""

    max_len: int = 384
    doc_stride: int = 128
    max_query_len: int = 64
    max_answer_len: int = 30
    n_best: int = 20

    @classmethod
    def of(cls, cfg: FinetuneConfig) -> SpanSettings:
        t = cfg.task
        return cls(t.max_len, t.doc_stride, t.max_query_len, t.max_answer_len, t.n_best).check()

    def check(self) -> SpanSettings:
        if min(self.max_query_len, self.max_answer_len, self.n_best) < 1 or self.doc_stride < 0:
            raise BertpipeError("task.max_query_len, max_answer_len and n_best must be positive, doc_stride >= 0")
        if self.doc_stride + self.max_query_len + 3 >= self.max_len:
            raise BertpipeError(f"task.max_len={self.max_len} leaves no new context per window: it must exceed "
                                f"doc_stride + max_query_len + 3 = {self.doc_stride + self.max_query_len + 3}")
        return self

    def meta(self) -> dict:
        return {"doc_stride": self.doc_stride, "max_query_len": self.max_query_len,
                "max_answer_len": self.max_answer_len, "n_best": self.n_best}


def window_tokenizer(encoder: WordPieceEncoder, settings: SpanSettings) -> Tokenizer:
    """The encoder's fast tokenizer, set to write `[CLS] question [SEP] context [SEP]` windows with overflow."""
    tok = Tokenizer.from_str(encoder.tokenizer.to_str())
    (cls_id,), (sep_id,) = encoder.prefix, encoder.suffix
    cls, sep = tok.id_to_token(cls_id), tok.id_to_token(sep_id)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, cls_id), (sep, sep_id)])
    tok.no_padding()
    tok.enable_truncation(settings.max_len, stride=settings.doc_stride, strategy="only_second")
    return tok


def cut_questions(encoder: WordPieceEncoder, questions: list[str], max_pieces: int) -> list[str]:
    """Questions longer than `max_pieces` pieces cut after their last whole piece that fits."""
    encodings = encoder.tokenizer.encode_batch(questions, add_special_tokens=False)
    return [q if len(e.ids) <= max_pieces else q[:e.offsets[max_pieces - 1][1]]
            for q, e in zip(questions, encodings, strict=True)]


def answer_chars(example: SquadExample, which: int = 0) -> tuple[int, int] | None:
    """The [start, end) characters of a gold answer, surrounding whitespace stripped (None: no answer given)."""
    if not example.answers:
        return None
    text, start = example.answers[which], example.starts[which]
    start += len(text) - len(text.lstrip())
    return start, start + len(text.strip())


def locate(offsets: np.ndarray, chars: tuple[int, int] | None) -> tuple[int, int] | None:
    """The first and last context piece (indices into `offsets`, the pieces' [start, end) characters) covering
    characters [start, end), or None when the window does not hold all of them."""
    if chars is None or offsets[0, 0] > chars[0] or offsets[-1, 1] < chars[1]:
        return None
    first = int(np.searchsorted(offsets[:, 0], chars[0], side="right")) - 1  # the piece the answer starts in
    last = int(np.searchsorted(offsets[:, 1], chars[1], side="left"))  # the first piece reaching its end
    return first, last


def build_windows(examples: list[SquadExample], encoder: WordPieceEncoder, settings: SpanSettings) -> list[dict]:
    """One feature per window: ids and token types (numpy), where the context starts, its pieces' character
    offsets and which of them continue a word, the first answer's start/end position (0 = [CLS]: not in this
    window), the example itself."""
    if not isinstance(encoder, WordPieceEncoder):
        raise BertpipeError("span tasks need a WordPiece vocabulary (its fast tokenizer's offsets map answers to "
                            "pieces): unset model.rnn.word_vocab")
    tok = window_tokenizer(encoder, settings)
    prefix = getattr(tok.model, "continuing_subword_prefix", "##")
    questions = cut_questions(encoder, [ex.question for ex in examples], settings.max_query_len)
    pairs = [(q, ex.context) for q, ex in zip(questions, examples, strict=True)]
    features = []
    for ex, encoding in zip(examples, tok.encode_batch(pairs), strict=True):
        chars = answer_chars(ex)
        for window in [encoding, *encoding.overflowing]:
            first = window.sequence_ids.index(1)  # [CLS] question [SEP] | context [SEP]
            offsets = np.asarray(window.offsets[first:-1], dtype=np.int32).reshape(-1, 2)
            continues = np.array([t.startswith(prefix) for t in window.tokens[first:-1]], dtype=bool)
            span = locate(offsets, chars)
            start, end = (first + span[0], first + span[1]) if span else (0, 0)
            features.append({"input_ids": np.asarray(window.ids, dtype=np.int32),
                             "token_type_ids": np.asarray(window.type_ids, dtype=np.int8),
                             "context_start": first, "offsets": offsets, "continues": continues,
                             "start_position": start,
                             "end_position": end, "example": ex, "index": len(features)})
    return features


@dataclass
class SpanCollator:
    """Pads windows; `start_mask` / `end_mask` mark the context pieces an answer may start / end at (a word's
    first / last piece), `index` points back at each feature."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        starts, ends = torch.zeros(ids.shape, dtype=torch.bool), torch.zeros(ids.shape, dtype=torch.bool)
        for i, f in enumerate(features):
            n, first, continues = len(f["input_ids"]), f["context_start"], torch.from_numpy(f["continues"])
            ids[i, :n] = torch.from_numpy(f["input_ids"])
            types[i, :n] = torch.from_numpy(f["token_type_ids"])
            mask[i, :n] = 1
            starts[i, first:first + len(continues)] = ~continues
            ends[i, first:first + len(continues)] = ~torch.cat([continues[1:], torch.zeros(1, dtype=torch.bool)])
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "start_mask": starts,
                "end_mask": ends,
                "start_positions": torch.tensor([f["start_position"] for f in features]),
                "end_positions": torch.tensor([f["end_position"] for f in features]),
                "index": torch.tensor([f["index"] for f in features])}


class SpanDataModule(TaskDataModule):
    """Windows of SQuAD examples: shuffled for training, in file order for evaluation."""

    def __init__(self, splits: dict[str, list], encoder: WordPieceEncoder, settings: SpanSettings,
                 batch_size: int = 32, num_workers: int = 0):
        super().__init__(splits, encoder, settings.max_len, batch_size, num_workers)
        self.settings = settings
        self.meta = settings.meta()  # fit() saves it in model/meta.json: predict cuts the same windows

    def encode(self, examples: list[SquadExample]) -> list[dict]:
        return build_windows(examples, self.encoder, self.settings)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return SpanCollator(self.encoder.pad_id)(features)


# ---- decoding --------------------------------------------------------------------------------------------


def top_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, start_mask: torch.Tensor, end_mask: torch.Tensor,
              n_best: int, max_answer_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `n_best` best (start, end) pairs of each window (B, S logits): scores, starts and ends (B, k), -inf
    where a window has fewer valid pairs. Valid: start where `start_mask`, end where `end_mask` (both inside the
    context), start <= end < start + max_answer_len."""
    width = start_logits.size(1)
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]
    position = torch.arange(width, device=scores.device)
    length = position[None, :] - position[:, None]  # end - start
    valid = ((length >= 0) & (length < max_answer_len))[None] & start_mask[:, :, None] & end_mask[:, None, :]
    top, flat = scores.masked_fill(~valid, -math.inf).flatten(1).topk(min(n_best, width * width), dim=1)
    return top, flat // width, flat % width


class Answers:
    """The candidates of each example over its windows, kept to the `n_best` best distinct spans."""

    def __init__(self, n_best: int):
        self.n_best = n_best
        self.candidates: dict[str, dict[tuple[int, int], float]] = {}  # id -> (start char, end char) -> score
        self.examples: dict[str, SquadExample] = {}

    def add(self, features: list[dict], scores: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> None:
        for f, row, row_starts, row_ends in zip(features, scores.tolist(), starts.tolist(), ends.tolist(),
                                                strict=True):
            ex, first, offsets = f["example"], f["context_start"], f["offsets"]
            self.examples[ex.id] = ex
            spans = self.candidates.setdefault(ex.id, {})
            for score, start, end in zip(row, row_starts, row_ends, strict=True):
                if score == -math.inf:
                    break
                chars = (int(offsets[start - first, 0]), int(offsets[end - first, 1]))
                spans[chars] = max(score, spans.get(chars, -math.inf))
            if len(spans) > self.n_best:
                kept = sorted(spans.items(), key=lambda kv: -kv[1])[:self.n_best]
                self.candidates[ex.id] = dict(kept)

    def n_best_list(self, qid: str) -> list[dict]:
        """The example's best spans, best first, with their softmax probability among them."""
        context = self.examples[qid].context
        ranked = sorted(self.candidates.get(qid, {}).items(), key=lambda kv: -kv[1])
        if not ranked:
            return [{"text": "", "score": -math.inf, "probability": 0.0, "start": 0, "end": 0}]
        probs = torch.tensor([s for _, s in ranked]).softmax(0).tolist()
        return [{"text": context[a:b], "score": s, "probability": p, "start": a, "end": b}
                for ((a, b), s), p in zip(ranked, probs, strict=True)]

    def texts(self) -> dict[str, str]:
        """{question id: answer text}: the official predictions format."""
        return {qid: self.n_best_list(qid)[0]["text"] for qid in self.examples}

    def scores(self) -> dict[str, float]:
        return squad_scores(self.texts(), list(self.examples.values()))


def squad_scores(predictions: dict[str, str], examples: list[SquadExample]) -> dict[str, float]:
    """Exact match and F1 (0-100) of `{id: text}` against every gold answer (torchmetrics' SQuAD)."""
    missing = [ex.id for ex in examples if ex.id not in predictions]
    if missing:
        raise BertpipeError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]}")
    preds = [{"prediction_text": predictions[ex.id], "id": ex.id} for ex in examples]
    target = [{"answers": {"answer_start": ex.starts, "text": ex.answers}, "id": ex.id} for ex in examples]
    return {k: float(v) for k, v in squad(preds, target).items()}


def trivial_baselines(examples: list[SquadExample], ks: tuple[int, ...] = (1, 2, 3, 5)) -> dict[str, dict[str, float]]:
    """EM/F1 of answers that read no question: the context's first k words for each k, and its first sentence.
    A trained reader must clear the best of them to show it reads the question at all."""
    rules = {f"first {k} words": lambda ex, k=k: " ".join(ex.context.split()[:k]) for k in ks}
    rules["first sentence"] = lambda ex: split_sentences(ex.context)[0]
    return {name: squad_scores({ex.id: rule(ex) for ex in examples}, examples) for name, rule in rules.items()}


# ---- the task module -------------------------------------------------------------------------------------


class SpanModule(TaskModule):
    """The base's optimizer, schedule and loop with the span loss (the mean of the start and the end
    cross-entropy over each window's positions, padding masked) and decoded EM/F1 on dev.

    Under DDP each rank's dev figures during training cover its share of the windows (averaged over ranks);
    results.json's come from one process over the whole split.
    """

    also_metrics = ("exact_match",)  # the leaderboard shows it beside the main metric (F1)

    def __init__(self, net: torch.nn.Module, spec: TaskSpec, optim: TrainerConfig, settings: SpanSettings):
        super().__init__(net, spec, optim)
        self.settings = settings
        self.answers = Answers(settings.n_best)
        self.evaluated: tuple[list[dict], Answers] | None = None  # the last evaluate()'s features and answers

    def new_metrics(self, **kwargs):
        return None  # EM/F1 are computed from decoded texts

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, S, 2): start and end logits at every position, padding masked."""
        logits = self.net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()
        return logits.masked_fill(batch["attention_mask"][..., None] == 0, -1e4)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        start, end = logits.unbind(-1)
        return (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2

    def spans(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        start, end = logits.unbind(-1)
        return top_spans(start, end, batch["start_mask"], batch["end_mask"], self.settings.n_best,
                         self.settings.max_answer_len)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        self.log("dev/loss", self.loss(logits, batch), batch_size=batch["input_ids"].size(0), sync_dist=True)
        features = self.trainer.val_dataloaders.dataset
        self.answers.add([features[i] for i in batch["index"].tolist()], *self.spans(logits, batch))

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"dev/{k}": v for k, v in self.answers.scores().items()}, sync_dist=True)
        self.answers = Answers(self.settings.n_best)

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, device: torch.device | str = "cpu") -> dict[str, float]:
        """Loss per window, exact match and F1 per question over a whole split."""
        self.eval().to(device)
        answers, loss, count = Answers(self.settings.n_best), 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = self(batch)
            loss += float(self.loss(logits, batch)) * len(logits)
            count += len(logits)
            answers.add([loader.dataset[i] for i in batch["index"].tolist()], *self.spans(logits, batch))
        self.evaluated = (loader.dataset, answers)
        return {"loss": loss / max(count, 1)} | answers.scores()


# ---- fit()'s task-kind hooks (recipes/base.py) -----------------------------------------------------------


def _check(cfg: FinetuneConfig) -> None:
    if cfg.model.kind not in SPAN_MODELS:
        raise BertpipeError(f"task {cfg.task.name} answers with spans: model.kind must be one of "
                            f"{', '.join(SPAN_MODELS)}, not {cfg.model.kind}")


def data_module(splits: dict[str, list], built: Built, cfg: FinetuneConfig) -> SpanDataModule:
    _check(cfg)
    return SpanDataModule(splits, built.encoder, SpanSettings.of(cfg), cfg.trainer.batch_size, cfg.trainer.num_workers)


def task_module(built: Built, spec: TaskSpec, cfg: FinetuneConfig) -> SpanModule:
    _check(cfg)
    return SpanModule(built.net, spec, cfg.trainer, SpanSettings.of(cfg))


def report(module: SpanModule, data: SpanDataModule, work: Path, device: str) -> dict[str, float]:
    """predictions.json ({question id: answer text}, the official format) of the dev split."""
    features = data.features["dev"]
    if module.evaluated is None or module.evaluated[0] is not features:
        module.evaluate(data.loader("dev"), device)
    texts = module.evaluated[1].texts()
    (work / "predictions.json").write_text(json.dumps(texts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {}
