"""BERT (Devlin et al., 2018) for pretraining, in one file.

The module tree and attribute names are those of HF transformers' `modeling_bert.py`, so `state_dict()` keys
equal `transformers.BertForPreTraining`'s and a checkpoint moves between the two by copying tensors.
Two things differ from HF, both for speed: attention always goes through `scaled_dot_product_attention`, and
the MLM head runs only on the masked positions (gathered before the transform and the vocabulary projection),
where HF projects every position onto the vocabulary.

Options: `config.gradient_checkpointing` recomputes each layer in the backward pass (for large at 512);
bf16/fp16 come from `autocast(...)` below and compilation from `torch.compile(model)`, both in the caller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (layers, hidden size, attention heads); the feed-forward is always 4x hidden, as in the paper
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),  # the paper's BERT-base, 110M parameters
    "large": (24, 1024, 16),  # the paper's BERT-large, 340M parameters
}


@dataclass
class BertConfig:
    """The architecture; field names are HF `BertConfig`'s, so config.json maps one to one."""

    vocab_size: int = 30522  # set from the vocab directory; 30522 is the original uncased vocabulary
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # 4x hidden, as in the paper
    max_position_embeddings: int = 512  # learned positions, so this caps the sequence length
    type_vocab_size: int = 2  # segment A and B
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12  # TF BERT's epsilon; checkpoints were trained with it
    initializer_range: float = 0.02  # std of the normal init of every weight matrix and embedding
    pad_token_id: int = 0  # [PAD]; its embedding row starts at zero and gets no gradient from lookups
    gradient_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if min(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.intermediate_size) < 1:
            raise ValueError("vocab_size, hidden_size, num_hidden_layers and intermediate_size must be positive")


def from_preset(name: str, vocab_size: int = 30522, **overrides) -> BertConfig:
    """The config of a named size (see PRESETS) for a vocabulary of `vocab_size` entries."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    layers, hidden, heads = PRESETS[name]
    fields = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden)
    return BertConfig(**(fields | overrides))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's init: normal(0, std) weights, zero biases, LayerNorm 1 and 0, a zero [PAD] embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---- the encoder ----------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, S, H = x.shape
        # (B, S, H) -> (B, heads, S, head size), the layout scaled_dot_product_attention expects
        q, k, v = (p(x).view(B, S, self.num_heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, S, H)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)  # post-LN, as in the original BERT


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU, HF's "gelu"


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                # keep only each layer's input; its activations are recomputed in the backward pass
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # the [CLS] token stands for the sequence


@dataclass
class BertModelOutput:
    last_hidden_state: torch.Tensor  # (B, S, H)
    pooler_output: torch.Tensor  # (B, H): tanh(dense([CLS])), what NSP and sentence classifiers read


class BertModel(nn.Module):
    """The bare encoder and pooler: what fine-tuning heads sit on (`BertForPreTraining.bert`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(partial(init_weights, std=config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> BertModelOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # (B, S) with 1 = real token -> (B, 1, 1, S) booleans, broadcast over heads and query positions
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.encoder(self.embeddings(input_ids, token_type_ids), mask)
        return BertModelOutput(last_hidden_state=x, pooler_output=self.pooler(x))


# ---- the pretraining heads -------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder's weight is tied to the word embeddings (BertForPreTraining ties it); its bias is this
        # output-only `bias`, shared under both names as in HF.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


@dataclass
class BertPreTrainingOutput:
    loss: torch.Tensor | None  # mlm_loss + nsp_loss, over whichever labels were given
    mlm_loss: torch.Tensor | None  # mean cross-entropy over the masked positions whose label is not -100
    nsp_loss: torch.Tensor | None
    mlm_logits: torch.Tensor  # (B, P, V) at `mlm_positions`, aligned with `mlm_labels`; (B, S, V) without them
    nsp_logits: torch.Tensor  # (B, 2); label 0 = B follows A, 1 = B is random


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM and next-sentence heads, taking a collated batch (see DESIGN.md).

    `mlm_logits` keep the batch layout (B, P, V) rather than a flat (N, V) of the real masked tokens: shapes
    follow the collated batch's padding, not how many tokens were masked, so with fixed padding
    `torch.compile` sees one shape; the padded slots (label -100) cost a few extra rows of the projection.
    Without `mlm_positions` every position is projected, (B, S, V), and `mlm_labels` are (B, S) as in HF.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.cls.apply(partial(init_weights, std=config.initializer_range))
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
    ) -> BertPreTrainingOutput:
        out = self.bert(input_ids, token_type_ids, attention_mask)
        x = out.last_hidden_state
        if mlm_positions is not None:
            # (B, S, H) -> (B, P, H): the transform and the vocabulary projection run on masked tokens only
            x = torch.gather(x, 1, mlm_positions[:, :, None].expand(-1, -1, x.size(-1)))
        mlm_logits = self.cls.predictions(x)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)

        mlm_loss = nsp_loss = None
        if mlm_labels is not None:
            # the mean over the labelled slots, 0 (not NaN) for a batch without any; no host sync either way
            labels = mlm_labels.flatten()
            mlm_loss = F.cross_entropy(mlm_logits.flatten(0, 1).float(), labels, ignore_index=-100,
                                       reduction="sum") / (labels != -100).sum().clamp(min=1)
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
        losses = [loss for loss in (mlm_loss, nsp_loss) if loss is not None]
        return BertPreTrainingOutput(
            loss=sum(losses) if losses else None, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
            mlm_logits=mlm_logits, nsp_logits=nsp_logits,
        )

    def num_parameters(self, only_encoder: bool = False) -> int:
        """Trainable parameters, each tied tensor counted once (as `transformers`' `num_parameters()` does).

        `only_encoder` counts the transformer layers alone (no embeddings, pooler or heads): the N of the
        6N FLOPs-per-token rule, since embedding lookups are not matmuls.
        """
        params = self.bert.encoder.parameters() if only_encoder else self.parameters()
        return sum(p.numel() for p in params)

    def flops_per_token(self, seq_len: int, masked_fraction: float = 0.15) -> float:
        """Training FLOPs (forward + backward) per input token, the convention MFU figures are quoted in.

        6 x encoder parameters (2 for the forward matmuls, 4 for the backward)
        + 12 * L * H * S for attention scores and their weighted sum (4 * L * H * S forward, non-causal)
        + 6 x (H^2 + H * V) x masked_fraction for the MLM transform and decoder on masked positions only.
        Embeddings, LayerNorms' elementwise work, the pooler and the NSP head (once per sequence) are left out.
        """
        c = self.config
        attention = 12 * c.num_hidden_layers * c.hidden_size * seq_len
        mlm_head = 6 * (c.hidden_size**2 + c.hidden_size * c.vocab_size) * masked_fraction
        return 6 * self.num_parameters(only_encoder=True) + attention + mlm_head

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as in BERT: no weight decay on biases and LayerNorm weights (the 1-D tensors)."""
        params = list(self.parameters())  # tied tensors appear once
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizer(
        self, lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6
    ) -> torch.optim.AdamW:
        """BERT's AdamW (beta2 0.999, eps 1e-6, decay 0.01); the fused kernel on GPU, where it exists."""
        fused = next(self.parameters()).device.type == "cuda"
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for "bf16" or "fp16" (the latter needs a GradScaler in the caller); "fp32" is a no-op.

    Weights stay fp32 (the optimizer's master copy); matmuls run in the low precision, and the losses are
    computed in fp32 (`forward` upcasts the logits).
    """
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r} (choose from fp32, bf16, fp16)")
    return torch.autocast(device_type, dtype=dtypes[precision])


def count_parameters(config: BertConfig) -> int:
    """The parameter count of a config without allocating it (the model is built on the meta device)."""
    with torch.device("meta"):
        return BertForPreTraining(config).num_parameters()

