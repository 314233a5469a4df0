"""The Lightning base every downstream recipe shares: configs, the task module, logging, `fit()`, results.

A recipe is a YAML file (`recipes/finetune/<task>.yaml`); recipes differ in their task and their model, never
in their loop. The model kind named by `model.kind` is a module (MODEL_KINDS) with two functions:

    build(cfg: FinetuneConfig, spec: TaskSpec) -> Built     # the network and its text encoder, fresh
    restore(meta: dict, directory: Path) -> (net, encoder)  # the same, rebuilt from a run's model/ directory

A network maps `(input_ids, attention_mask, token_type_ids)` to logits, one row per sequence ("classify"; a
sentence pair is one sequence, its second segment of token type 1), one score per sequence ("regress", a
single output) or a row per position ("tag"). Everything else — data, AdamW with linear warmup and decay,
metrics, checkpoints, `metrics.jsonl`, W&B, `results.json` and the weights `predict` reads — is here, once.

A run directory is built as `<run_dir>.incomplete/` and renamed when finished:

    config.yaml  metrics.jsonl  checkpoints/{best-stepN,last}.ckpt  wandb/  model/  results.json
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn

from pipeline.artifacts import claim_output, library_versions, mark, remove_own, sha256_file, swap_into, write_json
from pipeline.config import check_all, load_config, to_dict
from pipeline.errors import BertpipeError
from pipeline.schedule import warmup_decay
from pipeline.tracking import TrackConfig, without_secrets
from recipes.metrics import build_metrics
from recipes.tasks import TaskConfig, TaskDataModule, TaskSpec, TextEncoder, get_task, input_files, read_splits

log = logging.getLogger(__name__)

MODEL_KINDS = {"bert": "recipes.bert", "rnn": "recipes.rnn", "pooled": "recipes.rnn",  # model.kind -> module
               "rnn_lm": "recipes.rnn",  # with build() and restore(), and optionally task_module()
               "seq2seq": "recipes.seq2seq", "autoencoder": "recipes.autoencoder",
               "rnn_reader": "recipes.reader"}  # span QA: the RNN reader beside BERT's span head
# a task kind whose data, module and report serve every model kind that answers it (before the model kind's own)
TASK_KINDS = {"span": "recipes.squad"}
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}  # the project's names -> Lightning's
STRATEGIES = ("auto", "ddp", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2")
MODEL_DIR = "model"  # in a run directory: weights, meta.json and tokenizer files for `predict`


# ---- config ----------------------------------------------------------------------------------------------


@dataclass
class RnnConfig:
    """The RNN baselines' settings (model.kind rnn, pooled or rnn_lm; recipes/rnn.py)."""

    cell: str = "lstm"  # rnn (Elman) | lstm | gru
    explicit: bool = False  # the Elman cell unrolled step by step in Python (cell=rnn only), not torch's fused one
    hidden: int = 256  # per direction
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0  # between stacked layers (and before the output layer)
    embed_dim: int = 128
    pooling: str = "last"  # a text's vector: last (final states) | max | mean over the outputs (InferSent: max)
    mlp_hidden: int = 0  # > 0: an MLP with one tanh hidden layer this wide on the text's (or pair's) vector,
    # not one linear layer (GLUE's baselines: 512)
    init_embeddings: str | None = None  # a BERT (pretraining run, HF dir, checkpoint): its word embeddings, projected
    truncate_bptt: int = 0  # > 0: gradients flow back at most this many steps (the state is detached every k steps)
    word_vocab: bool = False  # a word-level vocabulary from the training split instead of WordPiece
    min_count: int = 2  # word_vocab: words seen fewer times are [UNK]
    max_vocab: int = 30_000  # word_vocab: the most frequent words kept

    def __post_init__(self) -> None:
        if self.cell not in ("rnn", "lstm", "gru"):
            raise ValueError("model.rnn.cell must be rnn, lstm or gru")
        if self.explicit and self.cell != "rnn":
            raise ValueError("model.rnn.explicit is the Elman cell: set model.rnn.cell=rnn")
        if self.truncate_bptt and self.bidirectional:
            raise ValueError("model.rnn.truncate_bptt needs a unidirectional RNN (the backward pass sees the future)")
        if self.pooling not in ("last", "max", "mean"):
            raise ValueError("model.rnn.pooling must be last, max or mean")
        if self.mlp_hidden < 0:
            raise ValueError("model.rnn.mlp_hidden must be >= 0")
        if min(self.hidden, self.layers, self.embed_dim) < 1 or not 0 <= self.dropout < 1:
            raise ValueError("model.rnn.hidden, layers and embed_dim must be positive, dropout in [0, 1)")


@dataclass
class Seq2seqConfig:
    """The encoder-decoder's settings (model.kind seq2seq, recipes/seq2seq.py); its RNNs follow model.rnn."""

    attention: str = "bahdanau"  # none (the encoder's final state is the only context) | bahdanau | luong
    teacher_forcing: float = 1.0  # chance of feeding the gold previous token in training; < 1: scheduled sampling
    beam: int = 4  # beam size for evaluation and `bertpipe translate`; 1 = greedy
    length_penalty: float = 0.6  # alpha of GNMT's ((5 + |Y|) / 6) ** alpha that beam scores are divided by
    max_len_ratio: float = 2.0  # a translation stops after ratio * source pieces + 10 new tokens ...
    max_new_tokens: int = 128  # ... or this many, whichever comes first
    tgt_vocab_dir: str | None = None  # the target side's WordPiece vocabulary (model.vocab_dir is the source's)

    def __post_init__(self) -> None:
        if self.attention not in ("none", "bahdanau", "luong"):
            raise ValueError("model.seq2seq.attention must be none, bahdanau or luong")
        if not 0 <= self.teacher_forcing <= 1 or self.length_penalty < 0:
            raise ValueError("model.seq2seq.teacher_forcing must be in [0, 1], length_penalty >= 0")
        if self.beam < 1 or self.max_new_tokens < 1 or self.max_len_ratio <= 0:
            raise ValueError("model.seq2seq.beam, max_new_tokens and max_len_ratio must be positive")


AUTOENCODERS = ("undercomplete", "denoising", "sparse", "variational", "convolutional")


@dataclass
class AutoencoderConfig:
    """The autoencoders' settings (model.kind autoencoder, recipes/autoencoder.py); text ones use model.rnn too."""

    variant: str = "undercomplete"  # one of AUTOENCODERS; text: undercomplete or denoising
    code_dim: int = 16  # the bottleneck's width
    hidden: int = 128  # the MLP's hidden layer (images)
    loss: str = "bce"  # images: mse | bce on pixels in [0, 1] (the decoder ends in a sigmoid); text: cross-entropy
    noise: str = "masking"  # denoising: gaussian (images), masking (pixels zeroed, tokens [UNK]) or dropout (tokens)
    noise_level: float = 0.3  # the Gaussian's sigma, or the share of pixels / tokens masked or dropped
    sparsity: str = "kl"  # sparse: kl (sigmoid codes, KL to a target rate) | l1 (mean |code|, linear codes)
    sparsity_weight: float = 0.1
    sparsity_target: float = 0.05  # kl: the target mean activation rho of each code unit
    beta: float = 1.0  # variational: the KL term's weight (1 = the negative ELBO itself)

    def __post_init__(self) -> None:
        checks = [
            (self.variant in AUTOENCODERS, f"model.autoencoder.variant must be one of {', '.join(AUTOENCODERS)}"),
            (self.loss in ("mse", "bce"), "model.autoencoder.loss must be mse or bce"),
            (self.noise in ("gaussian", "masking", "dropout"),
             "model.autoencoder.noise must be gaussian, masking or dropout"),
            (self.sparsity in ("l1", "kl"), "model.autoencoder.sparsity must be l1 or kl"),
            (min(self.code_dim, self.hidden) >= 1, "model.autoencoder.code_dim and hidden must be positive"),
            (self.noise_level >= 0 and (self.noise == "gaussian" or self.noise_level < 1),
             "model.autoencoder.noise_level must be >= 0 (and < 1 for masking or dropout)"),
            (0 < self.sparsity_target < 1, "model.autoencoder.sparsity_target must be in (0, 1)"),
            (self.sparsity_weight >= 0 and self.beta >= 0, "model.autoencoder.sparsity_weight and beta must be >= 0"),
        ]
        check_all(checks)


@dataclass
class ModelConfig:
    kind: str = "bert"  # a key of MODEL_KINDS
    encoder: str | None = None  # a pretraining run dir (its export/), an HF BERT dir or a bertpipe checkpoint
    preset: str | None = None  # instead of `encoder`: a randomly initialized encoder of this size
    vocab_dir: str | None = None  # the tokenizer; default: the encoder directory's own tokenizer files
    dropout: float | None = None  # before the classifier; default: the encoder's hidden_dropout_prob
    rnn: RnnConfig = field(default_factory=RnnConfig)  # kinds rnn, pooled, rnn_lm and seq2seq
    seq2seq: Seq2seqConfig = field(default_factory=Seq2seqConfig)  # kind seq2seq
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # kind autoencoder

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(MODEL_KINDS)}")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed (= ZeRO stage 2) | deepspeed_stage_1; deepspeed on GPUs only
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed: weights and optimizer stay fp32)
    max_epochs: int = 3
    max_steps: int = -1  # > 0: stop after this many optimizer steps, even within an epoch
    batch_size: int = 32  # per device
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5
    warmup_ratio: float = 0.1  # share of the optimizer steps with a linear warmup; then linear decay to 0
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    seed: int = 1234  # weights of the head, dropout and batch order (the data split has task.split_seed)
    val_check_interval: float = 1.0  # share of an epoch between dev evaluations
    limit_val_batches: float = 1.0  # share of the dev split seen by those evaluations (the final one sees all)
    num_workers: int = 0  # DataLoader worker processes
    checkpoint: bool = True  # keep the best (on the task's main dev metric) and the last Lightning checkpoint

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"trainer.strategy must be one of {', '.join(STRATEGIES)}"),
            (self.precision in PRECISION, f"trainer.precision must be one of {', '.join(PRECISION)}"),
            (self.accelerator in ("auto", "cpu", "gpu"), "trainer.accelerator must be auto, cpu or gpu"),
            (0 < self.val_check_interval <= 1 and 0 < self.limit_val_batches <= 1,
             "trainer.val_check_interval and trainer.limit_val_batches are shares in (0, 1]"),
            (self.batch_size > 0 and self.accumulate > 0 and self.devices > 0,
             "trainer.batch_size, trainer.accumulate and trainer.devices must be positive"),
            (0 <= self.warmup_ratio < 1, "trainer.warmup_ratio must be in [0, 1)"),
        ]
        check_all(checks)


@dataclass
class FinetuneConfig:
    run_dir: str = "build/runs/finetune"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    track: TrackConfig = field(default_factory=TrackConfig)  # W&B (offline by default); log_every = steps


@dataclass
class Built:
    """What a model kind's build() returns."""

    net: nn.Module
    encoder: TextEncoder
    meta: dict  # what restore() needs besides the weights (architecture, head); saved in model/meta.json
    describe: dict  # results.json's "model": kind, size and where it came from
    inputs: dict[str, list[dict]] = field(default_factory=dict)  # files the model came from, with sha256


def model_kind(name: str):
    """The module that builds and restores networks of a kind (imported only when used)."""
    if name not in MODEL_KINDS:
        raise BertpipeError(f"unknown model kind {name!r} (choose from {', '.join(MODEL_KINDS)})")
    return importlib.import_module(MODEL_KINDS[name])


def hook(kind, spec: TaskSpec, name: str):
    """fit()'s optional `name` hook (data_module, task_module, report): the task kind's, else the model kind's."""
    if spec.kind in TASK_KINDS:
        return getattr(importlib.import_module(TASK_KINDS[spec.kind]), name, None)
    return getattr(kind, name, None)


# ---- the task module -------------------------------------------------------------------------------------


class TaskModule(L.LightningModule):
    """Any network on any task of recipes/tasks/: loss, predictions, metrics, optimizer and schedule.

    Classification: cross-entropy, the argmax. Regression: the single output is the score, with mean squared
    error (HF's `problem_type="regression"`). Tagging: the network's per-piece logits are gathered at each
    word's first piece, so the loss, the predictions and the metrics are per word; words cut off by `max_len`
    get the task's default tag.
    """

    def __init__(self, net: nn.Module, spec: TaskSpec, optim: TrainerConfig | None = None):
        super().__init__()
        self.net, self.spec, self.optim = net, spec, optim or TrainerConfig()
        self.default_tag = spec.labels.index(spec.default_tag) if spec.default_tag else 0
        self.dev_metrics = self.new_metrics()

    def new_metrics(self, **kwargs: Any):
        """The task's dev metrics (a subclass with other outputs brings its own)."""
        return build_metrics(self.spec, **kwargs)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits: (B, labels) per sequence, (B,) scores, or (B, W, labels) per word."""
        logits = self.net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if self.spec.kind == "tag":
            index = batch["word_starts"].clamp(min=0)[..., None].expand(-1, -1, logits.size(-1))
            logits = torch.gather(logits, 1, index)
        elif self.spec.kind == "regress":
            logits = logits.squeeze(-1)
        return logits

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gold label ids (-100 on padding) or scores for the metrics."""
        return batch["tags"] if self.spec.kind == "tag" else batch["labels"]

    def predictions(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.spec.kind == "regress":
            return logits.float()
        preds = logits.argmax(-1)
        if self.spec.kind == "tag":
            preds = preds.masked_fill(batch["word_starts"] < 0, self.default_tag)
        return preds

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = self.targets(batch)
        if self.spec.kind == "regress":
            return F.mse_loss(logits.float(), target.float())
        if self.spec.kind == "tag":  # cut-off words have no logits of their own
            target = target.masked_fill(batch["word_starts"] < 0, -100)
        return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch)
        size = batch["input_ids"].size(0)
        self.log("train/loss", loss, batch_size=size)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        self.log("dev/loss", self.loss(logits, batch), batch_size=batch["input_ids"].size(0), sync_dist=True)
        self.dev_metrics.update(self.predictions(logits, batch), self.targets(batch))

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"dev/{k}": v.float() for k, v in self.dev_metrics.compute().items()})
        self.dev_metrics.reset()

    def configure_optimizers(self) -> dict:
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.optim.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases, LayerNorm
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=(0.9, 0.999), eps=1e-6)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.optim.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_decay(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device | str = "cpu") -> dict[str, float]:
        """Metrics over a whole split in one process (no sampler padding, no sync): what results.json holds."""
        metrics = self.new_metrics(sync_on_compute=False).to(device)
        self.eval().to(device)
        loss, count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = self(batch)
            n = int((self.targets(batch) != -100).sum())
            loss += float(self.loss(logits, batch)) * n
            count += n
            metrics.update(self.predictions(logits, batch), self.targets(batch))
        return {"loss": loss / max(count, 1)} | {k: float(v) for k, v in metrics.compute().items()}


# ---- logging ---------------------------------------------------------------------------------------------


class JsonlLogger(Logger):
    """`metrics.jsonl`, one line per event and step (`{"event": "dev", "step": 40, "accuracy": ...}`), the
    format of `pipeline.tracking`: readable by tests, plots and the leaderboard without W&B's private format."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The config is in config.yaml."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        events: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            event, _, name = key.rpartition("/")  # "dev/accuracy" -> event "dev"; "epoch" goes on every line
            events.setdefault(event, {})[name] = float(value)
        common = events.pop("", {})
        with open(self.path, "a") as fh:
            for event, values in events.items():
                fh.write(json.dumps({"event": event, "step": step} | common | values) + "\n")


class Throughput(Callback):
    """Examples per second of the training steps alone (forward, backward, optimizer), over all ranks."""

    def __init__(self) -> None:
        self.seconds, self.examples, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start
        self.examples += len(next(iter(batch.values()))) * trainer.world_size  # any batch dict: rows of its tensors

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


# ---- fit -------------------------------------------------------------------------------------------------


def _check_devices(cfg: TrainerConfig) -> None:
    """One clear line where Lightning would fail deep inside: DeepSpeed and `gpu` need CUDA."""
    on_gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if cfg.accelerator == "gpu" and not torch.cuda.is_available():
        raise BertpipeError("trainer.accelerator=gpu but no CUDA GPU is visible")
    if cfg.precision == "fp16" and not on_gpu:
        raise BertpipeError("trainer.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if cfg.strategy.startswith("deepspeed") and not on_gpu:
        raise BertpipeError(f"trainer.strategy={cfg.strategy} runs on CUDA GPUs only (Lightning's DeepSpeedStrategy "
                            "refuses the CPU); use trainer.strategy=auto or ddp on the CPU")


def hashed_files(paths: list[Path | str]) -> list[dict]:
    return [{"path": str(p), "sha256": sha256_file(p)} for p in paths if Path(p).is_file()]


def tokenizer_files(directory: str | Path) -> list[dict]:
    """The tokenizer files of a vocabulary directory with their sha256: what results.json's inputs record."""
    return hashed_files([Path(directory) / name for name in ("tokenizer.json", "vocab.txt")])


def save_for_predict(directory: Path, net: nn.Module, encoder: TextEncoder, meta: dict) -> Path:
    """What `predict` rebuilds a run from: the network's tensors (safetensors), meta.json, the tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(net, str(directory / "model.safetensors"), metadata={"format": "pt"})  # tied tensors once
    encoder.save(directory)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != "meta.json"}
    write_json(directory / "meta.json", meta | {"files": files})  # last: predict checks every file against it
    return directory


def load_run(run: str | Path) -> tuple[TaskModule, TextEncoder, dict]:
    """A finished run (or its model/ directory) as a TaskModule in eval mode, its encoder and its meta."""
    net, encoder, meta = load_net(run)
    return TaskModule(net, get_task(meta["task"])).eval(), encoder, meta


def load_net(run: str | Path) -> tuple[nn.Module, TextEncoder, dict]:
    """A finished run's network with its weights, its encoder and its meta (any model kind)."""
    run = Path(run)
    directory = run / MODEL_DIR if (run / MODEL_DIR).is_dir() else run
    if not (directory / "meta.json").is_file():
        raise BertpipeError(f"{run}: not a finetune run directory (no {MODEL_DIR}/meta.json)")
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise BertpipeError(f"{directory / 'meta.json'}: cannot read: {err}") from None
    for name, sha in meta.get("files", {"model.safetensors": None}).items():  # runs before "files": weights only
        path = directory / name
        if not path.is_file():
            raise BertpipeError(f"{path} is missing: the run is incomplete (train it again)")
        if sha is not None and sha256_file(path) != sha:
            raise BertpipeError(f"{path} does not match the sha256 in meta.json (truncated or damaged): train the "
                                "run again")
    spec = get_task(meta["task"])
    if tuple(meta["labels"]) != spec.labels:
        raise BertpipeError(f"{directory}: labels {meta['labels']} differ from task {spec.name}'s {list(spec.labels)}")
    net, encoder = model_kind(meta["kind"]).restore(meta, directory)
    try:
        load_safetensors(net, str(directory / "model.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise BertpipeError(f"{directory / 'model.safetensors'}: cannot load: {str(err).splitlines()[0]}") from None
    return net.eval(), encoder, meta


def _loggers(cfg: FinetuneConfig, work: Path) -> list[Logger]:
    loggers: list[Logger] = [JsonlLogger(work / "metrics.jsonl")]
    if cfg.track.wandb != "disabled":
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(mode=cfg.track.wandb, dir=str(work), project=cfg.track.project, entity=cfg.track.entity,
                         group=cfg.track.group, name=cfg.track.run_name or Path(cfg.run_dir).name,
                         config=without_secrets(to_dict(cfg)))
        loggers.append(WandbLogger(experiment=run))
    return loggers


def _route_lightning_logs() -> None:
    """Lightning's own lines (devices found, tips) through the project's log format, and only its warnings."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def _known_warnings_off() -> Iterator[None]:
    """Lightning warnings that say nothing about this run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # tokenized lists need no workers
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # a deprecation inside Lightning, torch 2.13
        warnings.filterwarnings("ignore", ".*srun. command is available.*")  # a SLURM install, not a SLURM job
        yield


def _trainer(cfg: FinetuneConfig, spec: TaskSpec, work: Path, main: bool, callbacks: list[Callback],
             progress_bar: bool) -> L.Trainer:
    t = cfg.trainer
    if t.checkpoint:
        callbacks = [*callbacks, ModelCheckpoint(work / "checkpoints", filename="best-step{step}", save_last=True,
                                                 monitor=f"dev/{spec.main_metric}",
                                                 mode="max" if spec.higher_is_better else "min",
                                                 auto_insert_metric_name=False)]
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=PRECISION[t.precision],
        max_epochs=t.max_epochs, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate,
        gradient_clip_val=t.grad_clip or None, val_check_interval=t.val_check_interval,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=cfg.track.log_every,
        logger=_loggers(cfg, work) if main else False, callbacks=callbacks, enable_checkpointing=t.checkpoint,
        enable_progress_bar=progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(work),
    )


def _prepare(run_dir: Path) -> Path:
    """The work directory `<run_dir>.incomplete/`, emptied (what a failed run left is not resumed) and marked."""
    work = run_dir.with_name(run_dir.name + ".incomplete")
    remove_own(work, "finetune")
    try:
        work.mkdir(parents=True)
    except OSError as err:
        raise BertpipeError(f"cannot create {work}: {err.strerror or err}") from None
    mark(work, "finetune")
    return work


def fit(cfg: FinetuneConfig, force: bool = False, progress_bar: bool = False) -> Path:
    """Fine-tune, evaluate on dev (and test, where the task has one) and write the run directory."""
    _check_devices(cfg.trainer)
    _route_lightning_logs()
    spec = get_task(cfg.task.name)
    run_dir = Path(cfg.run_dir)
    main = rank_zero_only.rank == 0  # ranks other than 0 re-run this command under Lightning's DDP launcher
    if main and claim_output(run_dir, "finetune") == "ours" and not force:
        raise BertpipeError(f"{run_dir} holds a finished run; pass --force to replace it")
    splits = read_splits(cfg.task, spec)  # bad input fails here, before a model is built or a file written
    work = _prepare(run_dir) if main else run_dir.with_name(run_dir.name + ".incomplete")
    try:
        return _fit(cfg, spec, splits, work, run_dir, main, progress_bar)
    except BaseException:
        if main:
            shutil.rmtree(work, ignore_errors=True)  # a failed run is not resumed: leave no debris
        raise


def _fit(cfg: FinetuneConfig, spec: TaskSpec, splits: dict, work: Path, run_dir: Path, main: bool,
         progress_bar: bool) -> Path:
    if main:
        (work / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    kind = model_kind(cfg.model.kind)
    built = kind.build(cfg, spec)
    # a kind whose examples are not texts to label (images, sentence pairs) brings its own data module, with the
    # same loader(split); a kind that is not a classifier or tagger (a language model, a translator, an
    # autoencoder) brings its own module: a TaskModule subclass with evaluate() and the task's main dev metric
    # a task whose examples are not texts to label (span QA) brings them for every model kind (TASK_KINDS)
    make_data, make_module = hook(kind, spec, "data_module"), hook(kind, spec, "task_module")
    data = (make_data(splits, built, cfg) if make_data else
            TaskDataModule(splits, built.encoder, cfg.task.max_len, cfg.trainer.batch_size, cfg.trainer.num_workers))
    module = make_module(built, spec, cfg) if make_module else TaskModule(built.net, spec, cfg.trainer)
    throughput = Throughput()
    log.info("fine-tuning %s (%s) on %s: %d train, %d dev examples", cfg.model.kind, built.describe.get("size"),
             spec.name, len(splits["train"]), len(splits["dev"]))
    with _known_warnings_off():
        trainer = _trainer(cfg, spec, work, main, [throughput], progress_bar)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        train_seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return run_dir

    device = "cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    evaluated = {split: module.evaluate(data.loader(split), device) for split in splits if split != "train"}
    report = hook(kind, spec, "report")
    if report:  # a kind's extra dev results and files (figures, predictions), written before the rename
        evaluated["dev"] |= report(module, data, work, device)
    for split, metrics in evaluated.items():
        log.info("%s %s: %s", spec.name, split, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    meta = {"kind": cfg.model.kind, "task": spec.name, "labels": list(spec.labels), "max_len": cfg.task.max_len,
            **built.meta, **getattr(data, "meta", {})}  # a data module's own settings, for predict (span windows)
    save_for_predict(work / MODEL_DIR, module.net, built.encoder, meta)
    write_json(work / "results.json", {
        "task": spec.name,
        "split": "dev",
        "main_metric": spec.main_metric,  # what the leaderboard ranks this task by
        "also_metrics": list(getattr(module, "also_metrics", ())),  # shown beside it (squad: exact_match)
        "higher_is_better": spec.higher_is_better,
        "metrics": evaluated["dev"],
        "splits": evaluated,  # every evaluated split: dev, and test where the task has one
        "model": built.describe,
        "params": sum(p.numel() for p in module.net.parameters()),
        "train_seconds": round(train_seconds, 3),
        "examples_per_second": round(throughput.rate, 2),
        "examples": {split: len(examples) for split, examples in splits.items()},
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "inputs": {split: hashed_files(paths) for split, paths in input_files(cfg.task, spec).items()}
                  | built.inputs,
        "config": to_dict(cfg),
        "versions": library_versions("torch", "lightning", "transformers", "torchmetrics", "seqeval"),
    })
    for logger in trainer.loggers:
        logger.log_metrics({f"final_{split}/{k}": v for split, m in evaluated.items() for k, v in m.items()},
                           step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    swap_into(work, run_dir, "finetune")
    return run_dir


def finetune_command(argv: list[str]) -> int:
    from pipeline.cli import config_parser
    from pipeline.log import setup_logging

    parser = config_parser("finetune", "Fine-tune a model on a downstream task (Lightning): SST-2, GLUE's CoLA, "
                           "MRPC, STS-B, RTE and WNLI, Rotten Tomatoes polarity, CoNLL-2003 NER, UD English POS or "
                           "SQuAD v1.1 span QA. Writes checkpoints, metrics.jsonl, W&B (offline by default) and "
                           "results.json into run_dir.", FinetuneConfig)
    parser.add_argument("--force", action="store_true", help="replace a finished run directory")
    args = parser.parse_intermixed_args(argv)
    quiet = args.quiet or rank_zero_only.rank > 0
    setup_logging(quiet)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    progress_bar = not quiet and (sys.stderr.isatty() or os.environ.get("BERTPIPE_PROGRESS") == "1")
    run = fit(cfg, force=args.force, progress_bar=progress_bar)
    if rank_zero_only.rank == 0:
        print(run)
    return 0

