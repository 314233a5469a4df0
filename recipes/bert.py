"""BERT heads for fine-tuning, and the encoder they sit on: the `bert` model kind of recipes/base.py.

The heads keep HF's module names (`bert.*`, `classifier.*`, `qa_outputs.*`), so their weights load into
`transformers.BertForSequenceClassification` / `BertForTokenClassification` / `BertForQuestionAnswering` by a
key copy (bench/finetune.py relies on it). Sentence pairs need no head of their own: `[CLS] a [SEP] b [SEP]`
with token types 0/1 is one sequence, classified from the pooled [CLS]; regression (STS-B) is the same head
with one output, which is `BertForSequenceClassification(num_labels=1)`, trained with mean squared error as
HF's `problem_type="regression"`. The encoder comes from a pretraining run directory (its `export/`), any HF
BERT directory or a bertpipe checkpoint (`pipeline.hf_interop.load_hf`), or is built at random from a preset.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import BertpipeError
from pipeline.hf_interop import load_hf
from pipeline.model import PRESETS, BertConfig, BertModel, from_preset, init_weights
from recipes.base import Built, FinetuneConfig, hashed_files, tokenizer_files
from recipes.tasks import TaskSpec, WordPieceEncoder

log = logging.getLogger(__name__)


class BertSequenceClassifier(nn.Module):
    """A linear classifier on the pooled [CLS] (tanh(dense(h_CLS))), as in the BERT paper and HF."""

    def __init__(self, bert: BertModel, num_labels: int, dropout: float | None = None):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        init_weights(self.classifier, bert.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.bert(input_ids, token_type_ids, attention_mask).pooler_output
        return self.classifier(self.dropout(pooled))


class BertTokenClassifier(nn.Module):
    """A linear tagger on every position's last hidden state; the task module reads each word's first piece.

    It has no pooler (as HF's BertForTokenClassification): unused parameters would stall DDP's gradient sync.
    """

    def __init__(self, bert: BertModel, num_labels: int, dropout: float | None = None):
        super().__init__()
        bert.pooler = nn.Identity()
        self.bert = bert
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        init_weights(self.classifier, bert.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, token_type_ids, attention_mask).last_hidden_state
        return self.classifier(self.dropout(hidden))


class BertSpanHead(nn.Module):
    """Start and end logits at every position, (B, S, 2), from a linear layer on the last hidden states: HF's
    BertForQuestionAnswering (`qa_outputs`, no pooler, no dropout before it)."""

    def __init__(self, bert: BertModel, num_labels: int = 2, dropout: float | None = None):
        super().__init__()
        bert.pooler = nn.Identity()
        self.bert = bert
        self.qa_outputs = nn.Linear(bert.config.hidden_size, num_labels)
        init_weights(self.qa_outputs, bert.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.qa_outputs(self.bert(input_ids, token_type_ids, attention_mask).last_hidden_state)


HEADS: dict[str, type[nn.Module]] = {"classify": BertSequenceClassifier, "regress": BertSequenceClassifier,
                                     "tag": BertTokenClassifier, "span": BertSpanHead}


def size_name(config: BertConfig) -> str:
    """The preset a config matches ("tiny", "base", ...), else its shape ("L6-H384-A6")."""
    shape = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads)
    return next((name for name, dims in PRESETS.items() if dims == shape), "L{}-H{}-A{}".format(*shape))


def _weights_file(source: Path) -> Path | None:
    if source.is_file():
        return source
    return next((source / n for n in ("model.safetensors", "pytorch_model.bin") if (source / n).is_file()), None)


def load_encoder(cfg: FinetuneConfig) -> tuple[BertModel, WordPieceEncoder, dict, dict]:
    """The encoder, its tokenizer, a description for results.json and the hashed input files."""
    m = cfg.model
    if m.encoder:
        source = Path(m.encoder)
        if not source.exists():
            raise BertpipeError(f"model.encoder {source} not found: give a pretraining run, an HF BERT directory or "
                                "a checkpoint (or model.encoder=null model.preset=tiny model.vocab_dir=DIR)")
        if (source / "export").is_dir():  # a pretraining run directory
            source = source / "export"
        pretrained, report = load_hf(source)
        bert, origin = pretrained.bert, str(m.encoder)
        vocab_dir = Path(m.vocab_dir) if m.vocab_dir else (source if source.is_dir() else source.parent)
        if report.missing:
            log.info("%s", report)
        weights = _weights_file(source)
    elif m.preset:
        if m.preset not in PRESETS:
            raise BertpipeError(f"model.preset {m.preset!r} is not one of {', '.join(PRESETS)}")
        if not m.vocab_dir:
            raise BertpipeError("model.preset builds a random encoder: set model.vocab_dir for its vocabulary")
        vocab_dir = Path(m.vocab_dir)
        bert = BertModel(from_preset(m.preset, WordPieceEncoder(vocab_dir).vocab_size))
        origin, weights = f"random init ({m.preset})", None
    else:
        raise BertpipeError("set model.encoder (a pretraining run, an HF BERT directory or a checkpoint) "
                            "or model.preset with model.vocab_dir")
    encoder = WordPieceEncoder(vocab_dir)
    config = bert.config
    if encoder.vocab_size > config.vocab_size:
        raise BertpipeError(f"{vocab_dir}: the tokenizer has {encoder.vocab_size} entries, the encoder's vocabulary "
                            f"{config.vocab_size}")
    if cfg.task.max_len > config.max_position_embeddings:
        raise BertpipeError(f"task.max_len={cfg.task.max_len} exceeds the encoder's "
                            f"{config.max_position_embeddings} positions")
    describe = {"kind": "bert", "size": size_name(config), "layers": config.num_hidden_layers,
                "hidden": config.hidden_size, "heads": config.num_attention_heads, "vocab_size": config.vocab_size,
                "encoder": origin}
    inputs = {"encoder": hashed_files([weights] if weights else []), "tokenizer": tokenizer_files(vocab_dir)}
    return bert, encoder, describe, inputs


def build(cfg: FinetuneConfig, spec: TaskSpec) -> Built:
    bert, encoder, describe, inputs = load_encoder(cfg)
    net = HEADS[spec.kind](bert, spec.num_outputs, cfg.model.dropout)
    meta = {"config": dataclasses.asdict(bert.config), "dropout": cfg.model.dropout}
    return Built(net, encoder, meta, describe, inputs)


def restore(meta: dict, directory: Path) -> tuple[nn.Module, WordPieceEncoder]:
    from recipes.tasks import get_task

    config = BertConfig(**meta["config"])
    spec = get_task(meta["task"])
    return HEADS[spec.kind](BertModel(config), spec.num_outputs, meta["dropout"]), WordPieceEncoder(directory)
