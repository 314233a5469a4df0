"""The RNN reader: the `rnn_reader` model kind, a span-QA baseline beside BERT's span head.

It reads the same windows as BERT (`[CLS] question [SEP] context [SEP]` in WordPiece pieces, token types 0/1)
and gives the same start and end logits at every position, so training, decoding, EM/F1 and predict are
recipes/squad.py's. A DrQA-style reader (Chen et al. 2017) cut down to the lecture's parts:

- every piece's embedding plus a segment embedding (question or context);
- two features that tell a context piece what the question asks: the exact match (1 where its id occurs in
  the question) and its aligned question embedding, attention from the context to the question
  (softmax_j relu(W e_i) . relu(W e_j) over the question's pieces j, then the weighted sum of their e_j);
- one (deep, bidirectional) RNN of model.rnn.* over [embedding; aligned embedding; exact match] of the whole
  window, question and context alike (recipes/rnn.py's `Recurrent`, packed);
- the question's vector: its pieces' RNN outputs pooled by a learned attention;
- start and end logits: bilinear h_i W_s q and h_i W_e q plus a linear term of h_i alone, at every position
  ([CLS] included, for windows without the answer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import BertpipeError
from recipes.base import Built, FinetuneConfig, RnnConfig, tokenizer_files
from recipes.rnn import Embeddings, Recurrent
from recipes.tasks import TaskSpec, WordPieceEncoder

NEG = -1e4  # a masked score: softmax weight 0 without the NaN of an all -inf row


class RnnReader(nn.Module):
    def __init__(self, vocab_size: int, pad_id: int, cfg: RnnConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.embed = Embeddings(vocab_size, pad_id, dim)
        self.segment = nn.Embedding(2, dim)
        self.align = nn.Linear(dim, dim)
        self.rnn = Recurrent(cfg, 2 * dim + 1)
        out = self.rnn.output_size
        self.question_attention = nn.Linear(out, 1)
        self.start = nn.Linear(out, out, bias=False)
        self.end = nn.Linear(out, out, bias=False)
        self.prior = nn.Linear(out, 2)  # a start and an end term of each position alone, beside the bilinear ones
        self.dropout = nn.Dropout(cfg.dropout)

    @staticmethod
    def question_mask(attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """The question's pieces: type 0 between [CLS] and the first [SEP]."""
        first_part = ((token_type_ids == 0) & attention_mask.bool()).sum(1, keepdim=True)  # [CLS] q [SEP]
        position = torch.arange(attention_mask.size(1), device=attention_mask.device)[None]
        return (position >= 1) & (position < first_part - 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        """(B, S, 2) start and end logits."""
        question = self.question_mask(attention_mask, token_type_ids)
        words = self.embed(input_ids)
        exact = ((input_ids[:, :, None] == input_ids[:, None, :]) & question[:, None, :]).any(-1)
        keys = torch.relu(self.align(words))
        weights = (keys @ keys.transpose(1, 2)).masked_fill(~question[:, None, :], NEG).softmax(-1)
        x = torch.cat([words + self.segment(token_type_ids), weights @ words, exact[..., None].to(words.dtype)], -1)
        h, _ = self.rnn(self.dropout(x), attention_mask.sum(1))
        h = self.dropout(h)
        pool = self.question_attention(h).squeeze(-1).masked_fill(~question, NEG).softmax(-1)
        q = (pool[..., None] * h).sum(1)[:, None]  # (B, 1, out)
        return torch.stack([(self.start(h) * q).sum(-1), (self.end(h) * q).sum(-1)], -1) + self.prior(h)


# ---- build and restore (recipes/base.py's model-kind interface) ------------------------------------------


def build(cfg: FinetuneConfig, spec: TaskSpec) -> Built:
    m, r = cfg.model, cfg.model.rnn
    if spec.kind != "span":
        raise BertpipeError(f"model.kind=rnn_reader answers questions: task {spec.name} is a {spec.kind} task "
                            "(use model.kind=rnn)")
    if r.word_vocab or r.init_embeddings:
        raise BertpipeError("model.kind=rnn_reader reads WordPiece windows (their offsets locate answers): unset "
                            "model.rnn.word_vocab and model.rnn.init_embeddings")
    if not m.vocab_dir:
        raise BertpipeError("set model.vocab_dir (the project's WordPiece vocabulary, e.g. build/vocab)")
    encoder = WordPieceEncoder(m.vocab_dir)
    net = RnnReader(encoder.vocab_size, encoder.pad_id, r)
    shape = f"{'bi' if r.bidirectional else ''}{r.cell}-L{r.layers}-H{r.hidden}"
    describe = {"kind": "rnn_reader", "size": shape, "cell": r.cell, "layers": r.layers, "hidden": r.hidden,
                "bidirectional": r.bidirectional, "embed_dim": r.embed_dim, "vocab_size": encoder.vocab_size,
                "tokenizer": "wordpiece"}
    meta = {"rnn": dataclasses.asdict(r), "vocab_size": encoder.vocab_size, "pad_id": encoder.pad_id}
    return Built(net, encoder, meta, describe, {"tokenizer": tokenizer_files(m.vocab_dir)})


def restore(meta: dict, directory: Path) -> tuple[nn.Module, WordPieceEncoder]:
    return RnnReader(meta["vocab_size"], meta["pad_id"], RnnConfig(**meta["rnn"])), WordPieceEncoder(directory)
