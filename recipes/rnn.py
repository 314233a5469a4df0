"""RNN baselines: the `rnn`, `pooled` and `rnn_lm` model kinds of recipes/base.py, in all four shapes.

- many-to-one (`rnn`, task kind classify): the final state of the last layer (both directions) -> labels;
- many-to-many, aligned (`rnn`, task kind tag): every position's output -> tags (the base reads first pieces);
- one-to-many (`rnn_lm`): a label sets the initial state and the network writes a sentence token by token,
  each sampled token fed back as the next input (`LabelLM.generate`, `bertpipe generate`);
- one-to-one (`pooled`): mean-pooled embeddings, one vector, one linear classifier, for contrast;
- sentence pairs (`rnn` or `pooled` on a pair task, InferSent-style as GLUE's own baselines): one shared
  encoder reads each sentence, u and v are pooled (max, mean or the final states), and an MLP classifies or
  scores [u; v; |u - v|; u * v]. With `pooled` the encoder is the mean of the embeddings (GLUE's CBOW).

The recurrence is either torch's fused nn.RNN / nn.LSTM / nn.GRU over packed sequences, or `ElmanRNN`, the
Elman equations h_t = tanh(W_xh x_t + b_ih + W_hh h_{t-1} + b_hh) unrolled in a Python loop, so that
backpropagation through time is the autograd graph of that loop. Both share parameter names, so weights
copy between them by `load_state_dict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from pipeline.errors import BertpipeError
from recipes.base import Built, FinetuneConfig, RnnConfig, TaskModule, load_net, tokenizer_files
from recipes.tasks import (
    TaskSpec,
    TextEncoder,
    TextExample,
    TextPairExample,
    WordPieceEncoder,
    read_splits,
    split_words,
)

log = logging.getLogger(__name__)

FUSED = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # per layer and direction, as nn.RNN names them
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # h, or (h, c) for the LSTM: (layers * directions, B, H)


# ---- the explicit Elman RNN ------------------------------------------------------------------------------


class ElmanRNN(nn.Module):
    """A (deep, bidirectional) Elman RNN unrolled over time in Python, with nn.RNN's parameter names.

    Layer l reads layer l-1's outputs (H_t^l = tanh(H_{t-1}^l W_hh^l + H_t^{l-1} W_xh^l + b^l)); a backward
    direction runs the same recurrence from the end, and the two outputs are concatenated. Padded steps
    (mask 0) leave the state unchanged and output zeros, which is what packing does in the fused RNN.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout
        self.directions = 2 if bidirectional else 1
        bound = 1 / math.sqrt(hidden_size)  # nn.RNN's initialization
        for layer in range(num_layers):
            size = input_size if layer == 0 else hidden_size * self.directions
            for suffix in ("", "_reverse")[:self.directions]:
                for name, shape in (("weight_ih", (hidden_size, size)), ("weight_hh", (hidden_size, hidden_size)),
                                    ("bias_ih", (hidden_size,)), ("bias_hh", (hidden_size,))):
                    self.register_parameter(f"{name}_l{layer}{suffix}",
                                            nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
        """One step of the recurrence; the input term W_xh x_t + b is computed for all steps beforehand."""
        return torch.tanh(x_proj + h @ w_hh.T)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, h0: torch.Tensor | None = None,
                truncate: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, in) -> outputs (B, S, directions * H) and the final states (layers * directions, B, H).

        `truncate` > 0 detaches the state every `truncate` steps: gradients flow back at most that far.
        """
        batch, steps = x.shape[:2]
        mask = torch.ones(batch, steps, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(("", "_reverse")[:self.directions]):
                p = {n: getattr(self, f"{n}_l{layer}{suffix}") for n in PARAMS}
                index = layer * self.directions + d
                h = x.new_zeros(batch, self.hidden_size) if h0 is None else h0[index]
                x_proj = x @ p["weight_ih"].T + p["bias_ih"] + p["bias_hh"]
                out: list[torch.Tensor] = [x_proj[:, 0]] * steps
                order = range(steps - 1, -1, -1) if d else range(steps)
                for n, t in enumerate(order):
                    if truncate and n and n % truncate == 0:
                        h = h.detach()  # truncated BPTT: the graph before this step is no longer reached
                    new = self.step(x_proj[:, t], h, p["weight_hh"])
                    keep = mask[:, t, None]
                    h = torch.where(keep, new, h)
                    out[t] = new * keep
                outputs.append(torch.stack(out, 1))
                finals.append(h)
            x = torch.cat(outputs, -1)
            if layer < self.num_layers - 1 and self.dropout and self.training:
                x = F.dropout(x, self.dropout, True)
        return x, torch.stack(finals)


# ---- the shared recurrence: explicit or fused, packed, truncated -----------------------------------------


def _select(state: State, index: torch.Tensor) -> State:
    return tuple(s[:, index] for s in state) if isinstance(state, tuple) else state[:, index]


def _scatter(state: State, index: torch.Tensor, part: State) -> State:
    if isinstance(state, tuple):
        return tuple(s.index_copy(1, index, p) for s, p in zip(state, part, strict=True))
    return state.index_copy(1, index, part)


def _detach(state: State) -> State:
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class Recurrent(nn.Module):
    """The configured RNN over right-padded batches: (B, S, in) and lengths -> outputs and final states."""

    def __init__(self, cfg: RnnConfig, input_size: int):
        super().__init__()
        self.cfg = cfg
        self.directions = 2 if cfg.bidirectional else 1
        between = cfg.dropout if cfg.layers > 1 else 0.0
        if cfg.explicit:
            self.rnn = ElmanRNN(input_size, cfg.hidden, cfg.layers, cfg.bidirectional, between)
        else:
            self.rnn = FUSED[cfg.cell](input_size, cfg.hidden, cfg.layers, batch_first=True, dropout=between,
                                       bidirectional=cfg.bidirectional)

    @property
    def output_size(self) -> int:
        return self.cfg.hidden * self.directions

    def initial(self, batch: int, device: torch.device) -> State:
        h = torch.zeros(self.cfg.layers * self.directions, batch, self.cfg.hidden, device=device)
        return (h, torch.zeros_like(h)) if self.cfg.cell == "lstm" else h

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, state: State | None = None
                ) -> tuple[torch.Tensor, State]:
        truncate = self.cfg.truncate_bptt if self.training else 0
        if self.cfg.explicit:
            mask = torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]
            return self.rnn(x, mask, state, truncate)
        if not truncate:
            return self._packed(x, lengths, state)
        # truncated BPTT: chunks of `truncate` steps, the state carried over but detached; sequences that have
        # ended drop out of a chunk (packing needs a length of at least one) and keep their final state
        state = self.initial(x.size(0), x.device) if state is None else state
        out = x.new_zeros(x.size(0), x.size(1), self.output_size)
        for start in range(0, x.size(1), truncate):
            n = (lengths - start).clamp(0, truncate)
            active = (n > 0).nonzero().squeeze(1)
            if not len(active):
                break
            part, last = self._packed(x[active, start:start + truncate], n[active], _detach(_select(state, active)))
            out = out.index_put((active[:, None], torch.arange(start, start + part.size(1))[None, :]), part)
            state = _scatter(state, active, last)
        return out, state

    def _packed(self, x: torch.Tensor, lengths: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, last = self.rnn(packed, state)
        return pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0], last

    def summary(self, state: State) -> torch.Tensor:
        """One vector per sequence: the last layer's final state, forward and backward concatenated."""
        h = state[0] if isinstance(state, tuple) else state
        return torch.cat(list(h[-self.directions:]), -1)


# ---- embeddings and the networks -------------------------------------------------------------------------


class Embeddings(nn.Module):
    """Token embeddings learned from scratch, or a BERT's word embeddings projected to `dim` (both trained)."""

    def __init__(self, vocab_size: int, pad_id: int, dim: int, source_dim: int | None = None):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, source_dim or dim, padding_idx=pad_id)
        self.project = nn.Linear(source_dim, dim) if source_dim else nn.Identity()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.word_embeddings(input_ids))


def head(width: int, hidden: int, outputs: int, dropout: float) -> nn.Module:
    """One linear layer, or (hidden > 0) an MLP with one tanh hidden layer, as GLUE's baselines classify."""
    if not hidden:
        return nn.Linear(width, outputs)
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, outputs))


def pool(out: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, S, D) outputs -> (B, D): the maximum or the mean over each sequence's real positions (mask 1)."""
    mask = mask.bool()[..., None]
    if how == "max":
        return out.masked_fill(~mask, -torch.inf).max(1).values
    return (out * mask).sum(1) / mask.sum(1).clamp(min=1)


class RnnNet(nn.Module):
    """Many-to-one (a label per sequence, from the final states or pooled outputs) or many-to-many (a tag per
    position)."""

    def __init__(self, vocab_size: int, pad_id: int, cfg: RnnConfig, num_labels: int, per_token: bool,
                 source_dim: int | None = None):
        super().__init__()
        self.per_token, self.pooling = per_token, cfg.pooling
        self.embed = Embeddings(vocab_size, pad_id, cfg.embed_dim, source_dim)
        self.rnn = Recurrent(cfg, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = head(self.rnn.output_size, 0 if per_token else cfg.mlp_hidden, num_labels, cfg.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        out, state = self.rnn(self.dropout(self.embed(input_ids)), attention_mask.sum(1))
        if self.per_token:
            return self.classifier(self.dropout(out))
        summary = self.rnn.summary(state) if self.pooling == "last" else pool(out, attention_mask, self.pooling)
        return self.classifier(self.dropout(summary))


class PairNet(nn.Module):
    """InferSent's pair classifier (Conneau et al. 2017; GLUE's baselines, Wang et al. 2019): one sentence
    encoder, shared, reads each side of the pair; u and v are pooled, and an MLP (`mlp_hidden`, one tanh
    hidden layer) maps [u; v; |u - v|; u * v] to labels or a score.

    The pair arrives as the data side encodes it for every model, segments one after the other with token types
    0 and 1 (`a [SEP] b [SEP]` for WordPiece: no [CLS], so both sides are encoded alike); the two segments are
    cut apart here and run through the encoder as one batch of 2B sentences. Without an RNN (`recurrent`
    false) a sentence is the mean of its embeddings (GLUE's CBOW).
    """

    def __init__(self, vocab_size: int, pad_id: int, cfg: RnnConfig, num_outputs: int,
                 source_dim: int | None = None, recurrent: bool = True):
        super().__init__()
        self.pad_id = pad_id
        self.pooling = cfg.pooling if recurrent else "mean"
        self.embed = Embeddings(vocab_size, pad_id, cfg.embed_dim, source_dim)
        self.rnn = Recurrent(cfg, cfg.embed_dim) if recurrent else None
        self.dropout = nn.Dropout(cfg.dropout)
        width = 4 * (self.rnn.output_size if recurrent else cfg.embed_dim)
        self.classifier = head(width, cfg.mlp_hidden, num_outputs, cfg.dropout)

    def segments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both segments of every pair, each from position 0: (2B, S') ids (first all a's, then all b's) and
        lengths (at least 1: an empty side is read as one padding token)."""
        valid = attention_mask.bool()
        len_a, len_b = (valid & (token_type_ids == 0)).sum(1), (valid & (token_type_ids == 1)).sum(1)
        positions = torch.arange(max(int(len_a.max()), int(len_b.max()), 1), device=input_ids.device)[None, :]
        last = input_ids.size(1) - 1
        ids = torch.cat([input_ids.gather(1, positions.expand(len(input_ids), -1).clamp(max=last)),
                         input_ids.gather(1, (len_a[:, None] + positions).clamp(max=last))])
        lengths = torch.cat([len_a, len_b]).clamp(min=1)
        return ids.masked_fill(positions >= lengths[:, None], self.pad_id), lengths

    def vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """u and v, (B, D) each: the shared encoder's vector of each side."""
        ids, lengths = self.segments(input_ids, attention_mask, token_type_ids)
        mask = torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]
        x = self.dropout(self.embed(ids))
        if self.rnn is None:
            vectors = pool(x, mask, "mean")
        else:
            out, state = self.rnn(x, lengths)
            vectors = self.rnn.summary(state) if self.pooling == "last" else pool(out, mask, self.pooling)
        u, v = vectors.chunk(2)
        return u, v

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        u, v = self.vectors(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], -1)))


class PooledNet(nn.Module):
    """One-to-one: the mean of a text's embeddings, one vector, into a linear classifier (word order unseen)."""

    def __init__(self, vocab_size: int, pad_id: int, cfg: RnnConfig, num_labels: int, source_dim: int | None = None):
        super().__init__()
        self.embed = Embeddings(vocab_size, pad_id, cfg.embed_dim, source_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.embed_dim, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask[..., None].float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(self.dropout(pooled))


class LabelLM(nn.Module):
    """One-to-many: a label's vector is the initial state of every layer; the RNN then writes a sentence,
    trained as a language model (next-token cross-entropy) on the sentences of that label.

    The label also adds a learned vector to every input token: through the initial state alone its influence
    fades within a few steps, and the samples of both labels end up alike.
    """

    def __init__(self, vocab_size: int, pad_id: int, cfg: RnnConfig, num_labels: int, source_dim: int | None = None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = Embeddings(vocab_size, pad_id, cfg.embed_dim, source_dim)
        self.label_state = nn.Embedding(num_labels, cfg.layers * cfg.hidden)
        self.label_input = nn.Embedding(num_labels, cfg.embed_dim)
        self.rnn = Recurrent(cfg, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, vocab_size)

    def initial(self, labels: torch.Tensor) -> State:
        h = torch.tanh(self.label_state(labels)).view(-1, self.cfg.layers, self.cfg.hidden).transpose(0, 1)
        h = h.contiguous()
        return (h, torch.zeros_like(h)) if self.cfg.cell == "lstm" else h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, S, vocab) for each position of `input_ids`."""
        x = self.embed(input_ids) + self.label_input(labels)[:, None]
        out, _ = self.rnn(self.dropout(x), attention_mask.sum(1), self.initial(labels))
        return self.head(self.dropout(out))

    @torch.no_grad()
    def generate(self, label: int, length: int, start_id: int, num: int = 1, temperature: float = 1.0,
                 top_k: int = 0, banned: Iterable[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
        """`num` samples of exactly `length` tokens (B, length), conditioned on `label`: softmax(logits / T)
        over the `top_k` most likely tokens (0 = all); `banned` ids (padding, specials) are never drawn."""
        if length < 1 or temperature <= 0:
            raise BertpipeError("generation needs length >= 1 and temperature > 0")
        device = self.head.weight.device
        labels = torch.full((num,), label, device=device)
        state, label_input = self.initial(labels), self.label_input(labels)[:, None]
        token = torch.full((num, 1), start_id, device=device)
        ones = torch.ones(num, dtype=torch.long, device=device)
        banned = torch.tensor(sorted(set(banned)), dtype=torch.long, device=device)
        out = []
        for _ in range(length):
            hidden, state = self.rnn(self.embed(token) + label_input, ones, state)
            logits = self.head(hidden[:, -1]).float() / temperature
            logits[:, banned] = -math.inf
            if 0 < top_k < logits.size(-1):
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(token)
        return torch.cat(out, 1)


class LanguageModelModule(TaskModule):
    """The base's module for the label-conditioned LM: the same optimizer, schedule, loop and evaluate(), with
    next-token targets. Its dev metric is next-token accuracy, logged under the task's main metric's name."""

    def new_metrics(self, **kwargs):
        return MetricCollection({self.spec.main_metric: MulticlassAccuracy(self.net.vocab_size, average="micro",
                                                                           ignore_index=-100, **kwargs)})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1], batch["labels"])

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)

    def predictions(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits.argmax(-1)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), self.targets(batch).flatten(), ignore_index=-100)

    def evaluate(self, loader, device: torch.device | str = "cpu") -> dict[str, float]:
        metrics = super().evaluate(loader, device)
        return metrics | {"perplexity": math.exp(min(metrics["loss"], 50.0))}


# ---- a word-level vocabulary -----------------------------------------------------------------------------


class WordEncoder:
    """A word-level vocabulary (`split_words`, case kept) of a training split's words seen `min_count` times;
    [BOS]/[EOS] around each text when `bounds` (the language model needs a start and an end)."""

    SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

    def __init__(self, words: list[str], bounds: bool = False):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.unk_id, self.vocab_size = 0, 1, len(self.words)
        self.prefix, self.suffix = ([2], [3]) if bounds else ([], [])

    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 2, max_vocab: int = 30_000, bounds: bool = False
            ) -> WordEncoder:
        counts = Counter(w for text in texts for w in split_words(text))
        kept = [w for w, c in counts.most_common(max_vocab - len(cls.SPECIALS)) if c >= min_count]
        return cls([*cls.SPECIALS, *kept], bounds)

    @classmethod
    def load(cls, directory: Path, bounds: bool = False) -> WordEncoder:
        return cls((directory / "words.txt").read_text(encoding="utf-8").split("\n")[:-1], bounds)

    def pieces(self, texts: list[str]) -> list[list[int]]:
        return [[self.index.get(w, self.unk_id) for w in split_words(t)] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def save(self, directory: Path) -> None:
        (directory / "words.txt").write_text("".join(w + "\n" for w in self.words), encoding="utf-8")


def decode(encoder: TextEncoder, ids: list[int]) -> str:
    if isinstance(encoder, WordPieceEncoder):
        return encoder.tokenizer.decode(ids)
    return encoder.decode(ids)


# ---- build and restore (recipes/base.py's model-kind interface) ------------------------------------------


def _net(kind: str, spec: TaskSpec, vocab_size: int, pad_id: int, cfg: RnnConfig, source_dim: int | None
         ) -> nn.Module:
    if kind == "rnn_lm":
        if spec.kind != "classify" or spec.pair or cfg.bidirectional:
            raise BertpipeError("model.kind=rnn_lm is a unidirectional LM conditioned on a labelled text task's label")
        return LabelLM(vocab_size, pad_id, cfg, len(spec.labels), source_dim)
    if spec.pair:
        return PairNet(vocab_size, pad_id, cfg, spec.num_outputs, source_dim, recurrent=kind == "rnn")
    if kind == "pooled":
        if spec.kind == "tag":
            raise BertpipeError("model.kind=pooled classifies whole texts: use kind rnn for a tagging task")
        return PooledNet(vocab_size, pad_id, cfg, spec.num_outputs, source_dim)
    return RnnNet(vocab_size, pad_id, cfg, spec.num_outputs, spec.kind == "tag", source_dim)


def _texts(examples: list) -> Iterable[str]:
    for ex in examples:
        if isinstance(ex, TextPairExample):
            yield from (ex.text_a, ex.text_b)
        else:
            yield ex.text if isinstance(ex, TextExample) else " ".join(ex.words)


def _segments(encoder: TextEncoder, spec: TaskSpec) -> TextEncoder:
    """A pair task's RNN reads each sentence as its own sequence: no [CLS] in front of the first (the second
    has none), so the shared encoder sees both sides alike; [SEP] still ends each."""
    if spec.pair:
        encoder.prefix = []
    return encoder


def build(cfg: FinetuneConfig, spec: TaskSpec) -> Built:
    m, r = cfg.model, cfg.model.rnn
    bounds = m.kind == "rnn_lm"
    inputs: dict[str, list[dict]] = {}
    source = None
    if r.word_vocab:
        if r.init_embeddings:
            raise BertpipeError("model.rnn.init_embeddings needs the BERT's WordPiece vocabulary: "
                                "set model.rnn.word_vocab=false")
        encoder: TextEncoder = WordEncoder.fit(_texts(read_splits(cfg.task, spec)["train"]), r.min_count,
                                               r.max_vocab, bounds)
        vocab_size, tokenizer = encoder.vocab_size, "word"
    elif r.init_embeddings:
        from recipes.bert import load_encoder

        # the BERT's own tokenizer, whatever model.vocab_dir says: its embedding rows are indexed by that vocabulary
        bert_cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, kind="bert", encoder=r.init_embeddings,
                                                                        preset=None, vocab_dir=None))
        bert, encoder, describe, inputs = load_encoder(bert_cfg)
        source = bert.embeddings.word_embeddings.weight.detach().clone()
        vocab_size, tokenizer = source.size(0), "wordpiece"
    else:
        if not m.vocab_dir:
            raise BertpipeError("set model.vocab_dir (the project's WordPiece vocabulary, e.g. build/vocab) "
                                "or model.rnn.word_vocab=true")
        encoder = WordPieceEncoder(m.vocab_dir)
        vocab_size, tokenizer = encoder.vocab_size, "wordpiece"
        inputs = {"tokenizer": tokenizer_files(m.vocab_dir)}
    source_dim = None if source is None else source.size(1)
    encoder = _segments(encoder, spec)
    net = _net(m.kind, spec, vocab_size, encoder.pad_id, r, source_dim)
    if source is not None:
        net.embed.word_embeddings.weight.data.copy_(source)
    shape = f"{'bi' if r.bidirectional else ''}{r.cell}{'-explicit' if r.explicit else ''}-L{r.layers}-H{r.hidden}"
    shape += "" if r.pooling == "last" or m.kind != "rnn" else f"-{r.pooling}"
    describe = {"kind": m.kind, "size": f"E{r.embed_dim}" if m.kind == "pooled" else shape, "cell": r.cell,
                "explicit": r.explicit, "layers": r.layers, "hidden": r.hidden, "bidirectional": r.bidirectional,
                "embed_dim": r.embed_dim, "vocab_size": vocab_size, "tokenizer": tokenizer,
                "embeddings": r.init_embeddings or "random init", "pooling": r.pooling}
    if spec.pair:
        describe |= {"pair": "[u; v; |u - v|; u * v]", "mlp_hidden": r.mlp_hidden}
    meta = {"rnn": dataclasses.asdict(r), "vocab_size": vocab_size, "pad_id": encoder.pad_id,
            "source_dim": source_dim, "bounds": bounds}
    return Built(net, encoder, meta, describe, inputs)


def task_module(built: Built, spec: TaskSpec, cfg: FinetuneConfig) -> TaskModule:
    cls = LanguageModelModule if cfg.model.kind == "rnn_lm" else TaskModule
    return cls(built.net, spec, cfg.trainer)


def restore(meta: dict, directory: Path) -> tuple[nn.Module, TextEncoder]:
    from recipes.tasks import get_task

    r = RnnConfig(**meta["rnn"])
    spec = get_task(meta["task"])
    encoder = WordEncoder.load(directory, meta["bounds"]) if r.word_vocab else WordPieceEncoder(directory)
    return _net(meta["kind"], spec, meta["vocab_size"], meta["pad_id"], r, meta["source_dim"]), _segments(encoder, spec)


# ---- bertpipe generate -----------------------------------------------------------------------------------


def generate(run: str | Path, label: str, length: int = 20, num: int = 5, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> list[str]:
    """Sentences written by a finished `rnn_lm` run, conditioned on `label` (one of its task's labels)."""
    net, encoder, meta = load_net(run)
    if meta["kind"] != "rnn_lm":
        raise BertpipeError(f"{run}: a {meta['kind']} run; generation needs model.kind=rnn_lm")
    if label not in meta["labels"]:
        raise BertpipeError(f"label {label!r} is not one of {', '.join(meta['labels'])}")
    banned = {encoder.pad_id, encoder.unk_id, *encoder.prefix, *encoder.suffix}
    if isinstance(encoder, WordPieceEncoder):  # [MASK] and the [unusedN] slots too, wherever the vocabulary has them
        banned.update(encoder.special.reserved)
    ids = net.generate(meta["labels"].index(label), length, encoder.prefix[0], num, temperature, top_k, banned,
                       torch.Generator().manual_seed(seed))
    return [decode(encoder, row) for row in ids.tolist()]


def generate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bertpipe generate", description="Write sentences with a finished "
                                     "label-conditioned RNN language model run (model.kind=rnn_lm).")
    parser.add_argument("--run", required=True, help="the run directory (or its model/ directory)")
    parser.add_argument("--label", required=True, help="the label to condition on, e.g. positive")
    parser.add_argument("--length", type=int, default=20, help="tokens per sentence")
    parser.add_argument("--num", type=int, default=5, help="sentences to write")
    parser.add_argument("--temperature", type=float, default=1.0, help="< 1 sharpens, > 1 flattens the softmax")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for line in generate(args.run, args.label, args.length, args.num, args.temperature, args.top_k, args.seed):
        print(line)
    return 0
