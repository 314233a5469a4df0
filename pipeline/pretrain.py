"""The pretrain stage: BERT MLM + NSP in a plain loop around a DeepSpeed engine.

One code path for the CPU (gloo) and GPUs (NCCL), launched by torchrun, the deepspeed launcher, srun or as a
single process. ZeRO, mixed precision, gradient accumulation and clipping are DeepSpeed's, configured from
the YAML (a DeepSpeed JSON may be merged on top). A checkpoint resumes on any number of ranks: the loader's
order is global and DeepSpeed's universal checkpoint reshards the optimizer. The loop, in the order one would
explain it: resume → for each step: micro-batches (forward, backward) → optimizer step → NaN check → log →
eval on the held-out split → checkpoint → probe → stop on SIGTERM/SIGUSR1 → at the end consolidate fp32
weights and export HF format.

Metrics are accumulated on the device and read back only when a line is logged: the one host sync per step
is a single small all-reduce (finite loss, a signal on any rank, rank 0's clock for time-based schedules).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from tokenizers import Tokenizer

from pipeline.artifacts import claim, mark, os_reason, owner, sha256_json, write_json
from pipeline.checkpoint import CheckpointManager
from pipeline.collate import MaskingConfig, MLMCollator, continuation_flags
from pipeline.config import check_all, to_dict
from pipeline.dataset import MASKING, PretrainingLoader, RowRandom, ShardSet, sample_keys
from pipeline.distributed import Dist, agree, all_sum, any_rank, barrier, init_distributed, placement
from pipeline.errors import BertpipeError
from pipeline.hf_interop import MODEL_CONFIG, consolidated_state, export_hf, load_weights, read_config
from pipeline.log import progress
from pipeline.model import PRESETS, BertForPreTraining, from_preset
from pipeline.probe import ProbeArgs, ProbeLog, probe_dir, run_probe, submit, wait_together, write_request
from pipeline.resume import check_resumable, config_changes
from pipeline.schedule import warmup_decay, warmup_poly
from pipeline.tracking import TrackConfig, Tracker, trim_metrics
from pipeline.vocab import load_vocab, vocab_hash
from tokenization import SpecialIds, special_ids

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun the same command to resume
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_labels", "next_sentence_label")
FLOP_CONVENTION = ("6 x encoder parameters + 12 x layers x hidden x seq (attention) per token, plus the MLM "
                   "transform and decoder on the masked positions only; forward + backward; padded positions count")
# dense bf16/fp16 tensor-core peak by a substring of the device name, the most specific names first
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                   "L4": 121.0, "V100": 125.0}


@dataclass
class ModelArgs:
    preset: str = "tiny"  # tiny | mini | small | medium | base | large
    init_from: str | None = None  # phase 2: a pretrain run dir, an HF BERT dir or a checkpoint (weights only)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each encoder layer in place (GPUs; compiles one layer's code once)
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" checks the capture without compiling)
    nsp: bool = True  # train the next-sentence head too (Izsak et al. and RoBERTa train MLM alone)
    dropout: float = 0.1
    max_positions: int = 512  # learned position embeddings: the longest sequence the model takes


@dataclass
class DataArgs:
    shards: str = "build/shards"
    vocab_dir: str = "build/vocab"
    # 0: evaluate on the shard stage's held-out split (eval_documents). N > 0: on the last N training shards
    # instead, for shards built without one -- not held out: they share documents with the training shards
    eval_shards: int = 0
    micro_batch: int = 32  # sequences per rank per forward pass
    global_batch: int = 256  # sequences per optimizer step over all ranks (gradient accumulation fills the gap)
    loader_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 10_000  # rows permuted together: windows of each epoch's (shuffled) shard order
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(max_predictions=0))


@dataclass
class OptimArgs:
    name: str = "adamw"  # adamw | lamb (LAMB is DeepSpeed's fused kernel: GPUs only)
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    warmup_steps: int = 100
    warmup_proportion: float = 0.0  # > 0: warmup lasts this share of the schedule instead (NVIDIA, Izsak et al.)
    # linear | poly: decay from the end of warmup to min_lr at the schedule's end; poly_from_start: lr x p/warmup,
    # then lr x (1 - p/total)^power, the decay counted from step 0 (google-research/bert's optimization.py with
    # power 1, NVIDIA's PolyWarmUpScheduler with power 0.5)
    schedule: str = "linear"
    power: float = 1.0  # for poly and poly_from_start
    min_lr: float = 0.0
    schedule_start: int = 0  # the schedule's position at this run's first step (NVIDIA counts from 1; phase 2 of
    schedule_steps: int = 0  # the paper continues at 900,000 of a 1,000,000-step schedule); 0 = max_steps
    schedule_hours: float = 0.0  # > 0: the schedule runs on training hours and training stops at this many
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class PretrainConfig:
    run_dir: str = "build/runs/pretrain"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    track: TrackConfig = field(default_factory=TrackConfig)
    max_steps: int = 1000  # optimizer steps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over the generated config
    eval_every: int = 100  # steps; 0 = never
    eval_batches: int = 20  # micro-batches per rank per evaluation (the same ones every time); 0 = the whole split
    checkpoint_every: int = 500  # steps; 0 = only at the end and on a signal
    keep_checkpoints: int = 3
    seed: int = 1234
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look it up (GPU) or estimate it (CPU)
    export: bool = True  # write run_dir/export in HF format at the end
    probe: ProbeArgs = field(default_factory=ProbeArgs)  # time-to-accuracy probes (pipeline/probe.py)

    def __post_init__(self) -> None:
        checks = [
            (self.model.preset in PRESETS, f"model.preset must be one of {', '.join(PRESETS)}"),
            (self.precision in ("fp32", "bf16", "fp16"), "precision must be fp32, bf16 or fp16"),
            (0 <= self.zero_stage <= 3, "zero_stage must be 0, 1, 2 or 3"),
            (self.optim.name in ("adamw", "lamb"), "optim.name must be adamw or lamb"),
            (self.optim.schedule in ("linear", "poly", "poly_from_start"),
             "optim.schedule must be linear, poly or poly_from_start"),
            (self.optim.name != "lamb" or self.zero_stage == 0,
             "optim.name=lamb needs zero_stage=0: ZeRO hands the optimizer flat partitions, which would turn LAMB's "
             "per-layer trust ratio into one per partition (and DeepSpeed refuses it as untested)"),
            (0 <= self.optim.warmup_proportion < 1, "optim.warmup_proportion must be in [0, 1)"),
            (self.max_steps > 0 and self.data.micro_batch > 0, "max_steps and data.micro_batch must be positive"),
        ]
        check_all(checks)


def lr_factor(step: int, cfg: PretrainConfig, hours: float = 0.0) -> float:
    """The lr factor of optimizer step `step` (from 0): warmup, then decay to min_lr at the schedule's end.

    The position is `step + schedule_start` of `schedule_steps` (default max_steps), or training hours of
    `schedule_hours` for a time-based schedule (Izsak et al.'s)."""
    o = cfg.optim
    floor = o.min_lr / o.lr
    if o.schedule_hours > 0:
        position, total = hours, o.schedule_hours
    else:
        position, total = step + o.schedule_start, o.schedule_steps or cfg.max_steps
    power = 1.0 if o.schedule == "linear" else o.power
    if o.schedule == "poly_from_start" or o.warmup_proportion > 0 or o.schedule_hours > 0:
        warmup = o.warmup_proportion * total if o.warmup_proportion > 0 else o.warmup_steps
        return warmup_poly(position, warmup, total, power, floor, from_start=o.schedule == "poly_from_start")
    return warmup_decay(position, o.warmup_steps, total, power, floor)


def deepspeed_config(cfg: PretrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config generated from the YAML, with a user JSON (if any) merged on top."""
    per_step = cfg.data.micro_batch * world_size
    if cfg.data.global_batch % world_size:
        raise BertpipeError(f"data.global_batch {cfg.data.global_batch} cannot be split evenly over {world_size} "
                            "ranks: run on a number of ranks that divides it")
    if cfg.data.global_batch % per_step:
        raise BertpipeError(f"data.global_batch {cfg.data.global_batch} is not a multiple of micro_batch x ranks "
                            f"= {cfg.data.micro_batch} x {world_size}; on {world_size} ranks data.micro_batch "
                            f"must divide {cfg.data.global_batch // world_size}")
    if cfg.optim.name == "lamb" and not on_gpu:
        raise BertpipeError("optim.name=lamb needs a GPU (DeepSpeed's fused LAMB); use adamw on the CPU")
    if cfg.precision == "fp16" and not on_gpu:
        raise BertpipeError("precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    o = cfg.optim
    params = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.optim.name == "lamb":
        optimizer = {"type": "Lamb", "params": params}  # DeepSpeed's fused LAMB (built on first use)
    else:  # AdamW: pretrain() passes torch's fused kernel in instead, unless a deepspeed_config names an optimizer
        optimizer = {"type": "AdamW", "params": {**params, "torch_adam": True}}
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": cfg.data.global_batch // per_step,
        "train_batch_size": cfg.data.global_batch,
        "gradient_clipping": o.grad_clip,  # 0 = none
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": optimizer,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        try:
            extra = json.loads(Path(cfg.deepspeed_config).read_text())
        except (OSError, ValueError) as err:
            raise BertpipeError(f"cannot read deepspeed_config {cfg.deepspeed_config}: {err}") from None
        config = _merge(config, extra)
    return config


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def peak_tflops(cfg: PretrainConfig, device: torch.device) -> tuple[float, str]:
    """Peak dense TFLOP/s of one device and where the figure comes from (for MFU)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                scale = 1.0 if cfg.precision != "fp32" else 0.5  # TF32 tensor cores run at half the bf16 rate
                return value * scale, f"{name} dense {'bf16/fp16' if scale == 1 else 'tf32'} datasheet"
        return 0.0, f"{name}: unknown peak (set peak_tflops)"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # fp32 FLOPs per core per cycle
    freq = psutil.cpu_freq()
    ghz = (freq.max or freq.current) / 1000 if freq else 2.5
    cores = torch.get_num_threads()
    return cores * ghz * per_cycle / 1000, f"CPU estimate: {cores} threads x {ghz:.2f} GHz x {per_cycle} FLOP/cycle"


class _Stop:
    """Remembers a SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def init_source(cfg: PretrainConfig) -> Path | None:
    """The checkpoint `model.init_from` names: a pretraining run's `export/`, an HF BERT directory or a checkpoint."""
    if not cfg.model.init_from:
        return None
    source = Path(cfg.model.init_from)
    if not source.exists():
        raise BertpipeError(f"model.init_from {source} not found: give a pretraining run, an HF BERT directory or "
                            "a checkpoint")
    return source / "export" if (source / "export").is_dir() else source


def _build_model(cfg: PretrainConfig, vocab_size: int, max_seq_len: int) -> BertForPreTraining:
    """A fresh model of `model.preset`, or, with `model.init_from`, the architecture that checkpoint declares
    (its config.json or model_config.json; the preset is then not used) with its weights loaded."""
    m = cfg.model
    training = {"hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.dropout,
                "gradient_checkpointing": m.gradient_checkpointing}
    source = init_source(cfg)
    if source is not None:
        config = dataclasses.replace(read_config(source), **training)
        own = source if source.is_dir() else source.parent
        if (own / "vocab.txt").is_file() and vocab_hash(own) != vocab_hash(cfg.data.vocab_dir):
            raise BertpipeError(f"model.init_from {source} was trained with another vocabulary than data.vocab_dir "
                                f"{cfg.data.vocab_dir} (their vocab.txt differ): shard with the checkpoint's own "
                                "vocabulary (bertpipe shard ... vocab_dir=<that directory>)")
        if config.vocab_size < vocab_size:
            raise BertpipeError(f"model.init_from {source} has a vocabulary of {config.vocab_size} entries, "
                                f"data.vocab_dir {cfg.data.vocab_dir} {vocab_size}: shard with the checkpoint's "
                                "own vocabulary")
    else:
        config = from_preset(m.preset, vocab_size, max_position_embeddings=m.max_positions, **training)
    if max_seq_len > config.max_position_embeddings:
        raise BertpipeError(f"the shards hold sequences of up to {max_seq_len} tokens, beyond the model's "
                            f"{config.max_position_embeddings} positions")
    model = BertForPreTraining(config)
    if source is not None:
        report = load_weights(model, source)
        log.info("initialized from %s (%s; the architecture is the checkpoint's: L%d H%d A%d, model.preset is "
                 "not used)", source, report, config.num_hidden_layers, config.hidden_size,
                 config.num_attention_heads)
    return model


class Clock:
    """Training time (the optimizer steps, not evaluation, checkpoints or probes) across resumes: what
    device-hours and time-based schedules count. Every rank uses rank 0's reading, agreed on each step."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    @property
    def hours(self) -> float:
        return self.seconds / 3600


def _window() -> dict:
    """A log window: host counts, and the device sums (MLM loss x predictions, NSP loss x sequences, MLM and
    NSP correct) read back only when the window is logged."""
    return {"sums": None, "loss": None, "steps": 0, "predictions": 0, "seqs": 0, "tokens": 0, "positions": 0,
            "time": 0.0, "digest": 0}


def _batch_sums(out, inputs: dict, predictions: int) -> torch.Tensor:
    """[MLM loss sum, NSP loss sum, MLM correct, NSP correct] of a micro-batch, on the device (no sync)."""
    labels = inputs["mlm_labels"]
    mlm_correct = ((out.mlm_logits.argmax(-1) == labels) & (labels != -100)).sum()
    parts = [out.mlm_loss.detach().double() * predictions, mlm_correct.double()]
    if out.nsp_loss is not None:
        size = inputs["input_ids"].shape[0]
        nsp_correct = (out.nsp_logits.argmax(-1) == inputs["next_sentence_label"]).sum()
        parts += [out.nsp_loss.detach().double() * size, nsp_correct.double()]
    else:
        parts += [torch.zeros_like(parts[0]), torch.zeros_like(parts[0])]
    return torch.stack([parts[0], parts[2], parts[1], parts[3]])


@dataclass
class _Setup:
    """What the checks before step 1 found: verified inputs, the model, and the checkpoint to resume from."""
    tokenizer: Tokenizer
    special: SpecialIds
    every: ShardSet
    train: ShardSet
    eval: ShardSet | None  # the held-out split (or the last training shards, with data.eval_shards)
    model: BertForPreTraining
    ds_config: dict
    tag: str | None = None  # the checkpoint to resume from
    meta: dict | None = None  # its meta.json
    step: int = 0
    changes: dict = field(default_factory=dict)  # config key -> (recorded, new): applied on resume


def _preflight(cfg: PretrainConfig, dist: Dist, checkpoints: CheckpointManager) -> _Setup:
    """Every check before step 1, on every rank, writing nothing: the run directory is free or this run's own,
    the vocabulary and every shard match their manifests, the config fits the world size, and a resumed run
    keeps what exact resume needs (pipeline/resume.py)."""
    state = claim(cfg.run_dir, "pretrain")
    tokenizer = load_vocab(cfg.data.vocab_dir)
    try:
        special = special_ids(tokenizer)
    except ValueError as err:
        raise BertpipeError(f"{cfg.data.vocab_dir}: {err}") from None
    every = ShardSet(cfg.data.shards)
    every.check_vocab(cfg.data.vocab_dir)
    model = _build_model(cfg, special.vocab_size, every.max_seq_len)  # its vocabulary against the shards' too
    ds_config = deepspeed_config(cfg, dist.world_size, dist.device.type == "cuda")
    train_set, eval_set = _splits(cfg, every)
    every.check_files(range(dist.rank, len(every.shards), dist.world_size))  # the ranks share the hashing
    if eval_set is not None and not cfg.data.eval_shards:  # the held-out split: its own shards
        eval_set.check_files(range(dist.rank, len(eval_set.shards), dist.world_size))
    setup = _Setup(tokenizer, special, every, train_set, eval_set, model, ds_config)
    setup.tag = checkpoints.latest() if state == "ours" else None
    if setup.tag:
        meta = setup.meta = checkpoints.check(setup.tag, dist.world_size, cfg.zero_stage)
        setup.step = meta["step"]
        if meta.get("shards_sha256", shards_digest(every)) != shards_digest(every):
            raise BertpipeError(f"cannot resume {cfg.run_dir} with data.shards={cfg.data.shards}: those are not "
                                f"the shards it trained on (their manifest differs); start a new run_dir")
        recorded = Path(cfg.run_dir) / "config.yaml"
        try:
            before = yaml.safe_load(recorded.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise BertpipeError(f"cannot read {recorded}, the config of the run to resume: {err}") from None
        changes = config_changes(before, to_dict(cfg), to_dict(PretrainConfig()))
        setup.changes = check_resumable(changes, cfg.run_dir)
    return setup


def shards_digest(shards: ShardSet) -> str:
    """The identity of a shard set (every shard's name, rows and sha256), recorded in each checkpoint."""
    return sha256_json(shards.manifest["shards"])


def _start_run_dir(cfg: PretrainConfig, setup: _Setup) -> None:
    """Write the run directory, once every check passed: its marker, the config in use (the recorded one is
    replaced only after the comparison) and metrics.jsonl without the lines after the checkpoint resumed."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if owner(run_dir) != "pretrain":
            mark(run_dir, "pretrain")
        dropped = trim_metrics(run_dir, setup.step)
        if dropped:
            log.info("metrics.jsonl: dropped %d line(s) after step %d, which this run logs again", dropped, setup.step)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
        # what `bertpipe export RUN_DIR` and `model-info --checkpoint RUN_DIR` rebuild the model from
        write_json(run_dir / MODEL_CONFIG, dataclasses.asdict(setup.model.config))
    except OSError as err:
        raise BertpipeError(f"cannot write the run directory {run_dir}: {os_reason(err)}") from None


def _rebase_schedule(scheduler, cfg: PretrainConfig, hours: float) -> None:
    """Put this config's LR schedule on the restored scheduler: load_checkpoint brings back the base LR it was
    saved with, which would silently override a changed optim.lr (the other schedule keys act through
    lr_factor). With an unchanged config this recomputes the very same LR."""
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = cfg.optim.lr
        group["lr"] = cfg.optim.lr * lr_factor(scheduler.last_epoch, cfg, hours)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def pretrain(cfg: PretrainConfig) -> int:
    """Run (or resume) pretraining in `cfg.run_dir`; returns 0 when done, EXIT_PREEMPTED after a signal."""
    dist = init_distributed()
    torch.manual_seed(cfg.seed + dist.rank)
    run_dir = Path(cfg.run_dir)
    checkpoints = CheckpointManager(run_dir, cfg.keep_checkpoints, dist.rank, dist.world_size)
    setup = agree(lambda: _preflight(cfg, dist, checkpoints))  # bad input: one line from rank 0, nothing written

    tokenizer, special, every = setup.tokenizer, setup.special, setup.every
    train_set, eval_set = setup.train, setup.eval
    max_len = every.max_seq_len
    masking = cfg.data.masking
    if masking.max_predictions == 0:  # BERT's: 20 at seq 128, 80 at 512
        masking = MaskingConfig(**{**to_dict(masking), "max_predictions": round(max_len * 5 / 32)})
    collator = MLMCollator(special, masking, continuation_flags(tokenizer) if masking.whole_word else None)
    loader = PretrainingLoader(train_set, collator, cfg.data.micro_batch, rank=dist.rank,
                               world_size=dist.world_size, workers=cfg.data.loader_workers, seed=cfg.seed,
                               shuffle_buffer=cfg.data.shuffle_buffer, global_batch=cfg.data.global_batch)
    held_out = HeldOut(eval_set, collator, cfg, dist) if eval_set is not None else None

    model = setup.model
    if cfg.model.compile:  # in place, layer by layer: parameter names stay HF's, and 24 layers compile once
        for layer in model.bert.encoder.layer:
            layer.compile(backend=cfg.model.compile_backend)
    ds_config = setup.ds_config
    tag, meta = setup.tag, setup.meta
    reshard = meta is not None and checkpoints.needs_universal(meta)
    if reshard:  # optimizer state partitioned over another number of ranks: DeepSpeed reshards it
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    import deepspeed

    client_optimizer = None
    if cfg.optim.name == "adamw" and not _user_optimizer(cfg):
        ds_config.pop("optimizer")  # torch's fused AdamW (GPU and CPU): no DeepSpeed op to compile anywhere
        o = cfg.optim
        client_optimizer = torch.optim.AdamW(model.to(dist.device).param_groups(o.weight_decay), lr=o.lr,
                                             betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                             fused=True)
    clock = Clock()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=None if client_optimizer else model.param_groups(cfg.optim.weight_decay),
        optimizer=client_optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, clock.hours)),
    )
    step = 0
    totals = {"tokens": 0, "positions": 0, "train_seconds": 0.0}
    if tag:
        state = agree(lambda: checkpoints.load(engine, tag, meta))
        step = state["step"]
        loader.load_state_dict(state["loader"])
        totals = {**totals, **state.get("totals", {})}
        clock.seconds = totals["train_seconds"]
        _rebase_schedule(scheduler, cfg, clock.hours)
        moved = (f" on {dist.world_size} rank(s), written by {meta['world_size']}"
                 f"{' (optimizer resharded from a universal checkpoint)' if reshard else ''}"
                 if meta["world_size"] != dist.world_size else "")
        log.info("resumed from %s at step %d%s%s", tag, step, moved, "; changed: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in setup.changes.items()) if setup.changes else "")
    agree(lambda: _start_run_dir(cfg, setup) if dist.main else None)  # written only once the checkpoint loaded

    peak, peak_source = peak_tflops(cfg, dist.device)
    tracker = Tracker(run_dir, cfg.track, to_dict(cfg), enabled=dist.main)
    ranks = placement(dist)
    if dist.main:
        layout = {"world_size": dist.world_size, "nodes": len({(r["node"], r["host"]) for r in ranks}),
                  "ranks": ranks}
        if step == 0:
            tracker.log({"flop_convention": FLOP_CONVENTION, "peak_tflops": peak, "peak_source": peak_source,
                         **layout, "deepspeed": ds_config}, step, event="start")
        else:  # the resume, with every config change it applies: the run's history of settings
            tracker.log({**layout, "from": tag, "written_by": meta["world_size"], "resharded": reshard,
                         "changes": {k: list(v) for k, v in setup.changes.items()}}, step, event="resume")
    flops_per_token = model.flops_per_token(max_len, masking.mlm_probability)
    probes = ProbeLog(run_dir, tracker) if dist.main and cfg.probe.every else None
    prober = Prober(cfg, engine, model, checkpoints, dist, probes) if cfg.probe.every else None
    stop = _Stop()
    grad_accum = ds_config["gradient_accumulation_steps"]
    inputs_of = _to_device(dist.device)
    batches = iter(loader)
    bar = progress(total=cfg.max_steps, initial=step, unit="step", desc="pretrain", disable=not dist.main)
    window = _window()
    grad_norm = None
    preempted = False
    if prober and cfg.probe.mode == "inline" and step and prober.pending(step):  # stopped during a probe: again
        prober(step, _compute(totals, flops_per_token, dist))

    def logs_at(s: int) -> bool:
        """Whether step `s` writes a metrics line: every log_every, and at evaluations, probes and checkpoints,
        so that their compute totals are current (the gradient norm is computed only for these steps)."""
        return (s % cfg.track.log_every == 0 or s == cfg.max_steps or bool(prober and s % cfg.probe.every == 0)
                or bool(held_out and s % cfg.eval_every == 0) or bool(cfg.checkpoint_every and
                                                                     s % cfg.checkpoint_every == 0))

    try:
        while step < cfg.max_steps:
            start = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler moves after the update)
            log_step = logs_at(step + 1)
            step_loss = None
            for _ in range(grad_accum):
                batch = next(batches)
                predictions = int((batch["mlm_labels"] != -100).sum())  # host tensors: no device sync
                inputs = inputs_of(batch)
                if not cfg.model.nsp:
                    inputs.pop("next_sentence_label")
                # dropout drawn from the micro-batch's own seed: the same on whichever rank serves it, on any
                # world size, after any resume
                torch.manual_seed(int(batch["seed"]))
                out = engine(**inputs)
                engine.backward(out.loss)
                boundary = engine.is_gradient_accumulation_boundary()
                unsharded_norm = _param_grad_norm(engine) if boundary and log_step and cfg.zero_stage == 0 else None
                engine.step()
                if boundary and log_step:  # ZeRO optimizers compute the norm inside step()
                    grad_norm = unsharded_norm if cfg.zero_stage == 0 else engine.get_global_grad_norm()
                loss = out.loss.detach().float()
                step_loss = loss if step_loss is None else step_loss + loss
                sums = _batch_sums(out, inputs, predictions)
                window["sums"] = sums if window["sums"] is None else window["sums"] + sums
                window["digest"] += zlib.crc32(batch["rows"].numpy().tobytes())
                window["predictions"] += predictions
                window["seqs"] += batch["input_ids"].shape[0]
                window["tokens"] += int(batch["attention_mask"].sum())
                window["positions"] += batch["input_ids"].numel()
            step_loss = step_loss / grad_accum
            # the step's one host sync: a finite loss on every rank, a signal on any, rank 0's clock
            elapsed = clock.seconds + time.perf_counter() - start
            bad, signalled, seconds = _agree(step_loss, stop.signal is not None, elapsed if dist.main else 0.0,
                                             dist.device)
            if bad:
                _fail_non_finite(step + 1, float(step_loss), batch, train_set, checkpoints, dist)
            step += 1
            clock.seconds = seconds
            window["loss"] = step_loss if window["loss"] is None else window["loss"] + step_loss
            window["steps"] += 1
            window["time"] += time.perf_counter() - start
            bar.update()
            out_of_time = cfg.optim.schedule_hours > 0 and clock.hours >= cfg.optim.schedule_hours
            last = step == cfg.max_steps or out_of_time
            probe_now = prober is not None and (step % cfg.probe.every == 0 or last)
            eval_now = held_out is not None and (step % cfg.eval_every == 0 or last)
            if logs_at(step) or last or signalled:
                record = _train_record(window, engine, dist, flops_per_token, peak, grad_norm, lr, cfg.model.nsp)
                totals["tokens"] += record.pop("window_tokens")
                totals["positions"] += record.pop("window_positions")
                totals["train_seconds"] = clock.seconds
                tracker.log(record | _compute(totals, flops_per_token, dist), step)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                window = _window()
            if eval_now:
                tracker.log(held_out(engine) | _compute(totals, flops_per_token, dist), step, event="eval")
            if signalled or probe_now or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
                _save(checkpoints, engine, step, loader, cfg, dist, totals)
            if probe_now:
                prober(step, _compute(totals, flops_per_token, dist))
            elif probes and step % cfg.track.log_every == 0:
                probes.collect(step)  # results of probe jobs (slurm) that finished meanwhile
            if signalled and not last:
                log.warning("stopped by a signal at step %d after a checkpoint; rerun to resume", step)
                preempted = True
                break
            if out_of_time:
                log.info("the %g-hour time budget is spent at step %d", cfg.optim.schedule_hours, step)
                break
    finally:
        bar.close()
        if probes and not preempted:
            probes.finish(step)
        tracker.close()
    if preempted:
        return EXIT_PREEMPTED
    if cfg.export:
        _export(engine, model, cfg, checkpoints, dist)
    barrier()
    return 0


def _splits(cfg: PretrainConfig, every: ShardSet) -> tuple[ShardSet, ShardSet | None]:
    """The training shards and the evaluation split: the held-out documents, or (eval_shards > 0) the last
    training shards for shards built without them."""
    if not cfg.eval_every:
        return every, None
    n_shards, held = len(every.shards), cfg.data.eval_shards
    if held:
        if not 0 < held < n_shards:
            raise BertpipeError(f"data.eval_shards={held} must leave training shards (there are {n_shards}); "
                                "set eval_every=0 to skip evaluation")
        log.warning("evaluating on the last %d training shard(s): they share documents with the training "
                    "shards, so this is not a held-out score (build the shards with eval_documents)", held)
        return (ShardSet(cfg.data.shards, shards=list(range(n_shards - held))),
                ShardSet(cfg.data.shards, shards=list(range(n_shards - held, n_shards))))
    try:
        return every, ShardSet(cfg.data.shards, split="eval")
    except BertpipeError as err:
        raise BertpipeError(f"{err}; or set eval_every=0 (no evaluation)") from None


def _user_optimizer(cfg: PretrainConfig) -> bool:
    if not cfg.deepspeed_config:
        return False
    try:
        return "optimizer" in json.loads(Path(cfg.deepspeed_config).read_text())
    except (OSError, ValueError):
        return False  # deepspeed_config() reports it


def _to_device(device: torch.device):
    """A collated batch's model inputs on the device: asynchronous copies on a GPU (the loader pins them)."""
    if device.type != "cuda":
        return lambda batch: {k: batch[k].to(device) for k in MODEL_INPUTS}
    return lambda batch: {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
                          for k, v in ((k, batch[k]) for k in MODEL_INPUTS)}


def _agree(loss: torch.Tensor, signalled: bool, seconds: float, device: torch.device) -> tuple[bool, bool, float]:
    """(non-finite loss on any rank, a signal on any rank, rank 0's clock): one all-reduce, one host sync."""
    import torch.distributed as tdist

    flags = torch.stack([(~torch.isfinite(loss)).double(), loss.new_full((), float(signalled), dtype=torch.float64),
                         loss.new_full((), seconds, dtype=torch.float64)])  # fills on the device: no copies
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    bad, signal_flag, clock = flags.tolist()
    return bad > 0, signal_flag > 0, clock


def _compute(totals: dict, flops_per_token: float, dist: Dist) -> dict:
    """Compute spent so far, by the FLOP convention of the start line: tokens, FLOPs, device-hours."""
    return {"tokens_seen": int(totals["tokens"]), "flops": flops_per_token * totals["positions"],
            "device_hours": totals["train_seconds"] * dist.world_size / 3600}


class HeldOut:
    """MLM loss and accuracy, NSP loss and accuracy on the evaluation split, the same batches every time.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively, so a rank that
    stopped early would leave the others waiting): rank 0 has the most rows; a rank out of rows repeats a
    batch that counts for nothing. Sums are token- and sequence-weighted and summed over ranks once.
    """

    def __init__(self, shards: ShardSet, collator: MLMCollator, cfg: PretrainConfig, dist: Dist):
        self.shards, self.collator, self.cfg, self.dist = shards, collator, cfg, dist
        streams = dist.world_size
        most_rows = (shards.rows + streams - 1) // streams  # rank 0's share of the split
        self.passes = math.ceil(most_rows / cfg.data.micro_batch)
        if cfg.eval_batches:
            self.passes = min(self.passes, cfg.eval_batches)

    def _batches(self) -> Iterator[dict]:
        """This rank's rows of the split (every world_size-th from its rank: rank 0 has the most), in order,
        masked alike every time (draws keyed per row)."""
        mine = np.arange(self.dist.rank, self.shards.rows, self.dist.world_size)
        for start in range(0, len(mine), self.cfg.data.micro_batch):
            rows = mine[start:start + self.cfg.data.micro_batch]
            ids, types, labels = self.shards.fetch(rows.tolist())
            yield self.collator(ids, types, labels, RowRandom(sample_keys(self.cfg.seed + 1, rows, MASKING)))

    @torch.no_grad()
    def __call__(self, engine) -> dict:
        cfg, dist = self.cfg, self.dist
        batches, spare = self._batches(), None
        inputs_of = _to_device(dist.device)
        sums = torch.zeros(6, dtype=torch.float64, device=dist.device)
        engine.eval()
        for _ in range(self.passes):
            batch = next(batches, None)
            real = batch is not None
            batch = batch if real else spare
            spare = spare or batch
            inputs = inputs_of(batch)
            if not cfg.model.nsp:
                inputs.pop("next_sentence_label")
            out = engine(**inputs)
            if real:
                predictions = int((batch["mlm_labels"] != -100).sum())
                counts = torch.tensor([predictions, batch["input_ids"].shape[0]], dtype=torch.float64)
                sums += torch.cat([_batch_sums(out, inputs, predictions), counts.to(dist.device)])
        engine.train()
        import torch.distributed as tdist

        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(sums)
        mlm_sum, nsp_sum, mlm_correct, nsp_correct, predictions, seqs = sums.tolist()
        mlm_loss = mlm_sum / max(predictions, 1)
        record = {"mlm_loss": mlm_loss, "mlm_acc": mlm_correct / max(predictions, 1),
                  "mlm_perplexity": math.exp(min(mlm_loss, 50.0)), "batches": self.passes,
                  "sequences": int(seqs), "predictions": int(predictions)}
        if cfg.model.nsp:
            record |= {"nsp_loss": nsp_sum / max(seqs, 1), "nsp_acc": nsp_correct / max(seqs, 1)}
        record["loss"] = mlm_loss + record.get("nsp_loss", 0.0)
        return record


class Prober:
    """Runs a probe (pipeline/probe.py) at a step: rank 0 exports the weights and, inline, fine-tunes them
    while every rank waits in short polls; under SLURM it submits the probe's job and training goes on."""

    def __init__(self, cfg: PretrainConfig, engine, model: BertForPreTraining, checkpoints: CheckpointManager,
                 dist: Dist, probes: ProbeLog | None):
        self.cfg, self.engine, self.model, self.checkpoints, self.dist = cfg, engine, model, checkpoints, dist
        self.probes = probes
        self.last_job: str | None = None

    def pending(self, step: int) -> bool:
        directory = probe_dir(self.cfg.run_dir, step)
        return (directory / "request.json").exists() and not (directory / "probe.json").exists()

    def __call__(self, step: int, compute: dict) -> None:
        cfg, dist = self.cfg, self.dist
        directory = probe_dir(cfg.run_dir, step)

        def work() -> None:  # rank 0, in a thread, while every rank polls
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            final = _latest_weights(self.model, self.checkpoints)
            export_hf(final, directory / "export", cfg.data.vocab_dir)
            write_request(directory, step, compute, cfg.probe)
            if cfg.probe.mode == "slurm":
                self.last_job = submit(directory, self.last_job, cfg.probe.sbatch_args)
                log.info("probe at step %d: SLURM job %s", step, self.last_job)
            else:
                run_probe(directory)

        start = time.perf_counter()
        error = wait_together(work if dist.main else None, lambda done: any_rank(done, dist.device))
        if not dist.main:
            return
        if error is not None:  # a probe never stops pretraining: it says why and training goes on
            log.warning("probe at step %d did not finish: %s", step, error)
            return
        for result in self.probes.collect(step):
            scores = ", ".join(f"{n} {t['metric']} {t['value']:.4f}" for n, t in result["tasks"].items())
            log.info("probe at step %d: %s (%.0f s)", result["step"], scores, time.perf_counter() - start)


def _param_grad_norm(engine) -> torch.Tensor | None:
    """The gradient norm before clipping under ZeRO stage 0, whose gradients are whole on every rank
    (ZeRO's optimizers compute it themselves: engine.get_global_grad_norm()); a device tensor."""
    grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None


def _train_record(window: dict, engine, dist: Dist, flops_per_token: float, peak: float,
                  grad_norm, lr: float, nsp: bool = True) -> dict:
    """The window's metrics line: the device sums read back here, once, with the host counts, over all ranks."""
    steps, seconds = max(window["steps"], 1), max(window["time"], 1e-9)
    sums = window["sums"].tolist() if window["sums"] is not None else [0.0] * 4
    host = [window["predictions"], window["seqs"], window["tokens"], window["positions"], window["digest"]]
    loss = float(window["loss"]) / steps if window["loss"] is not None else float("nan")
    totals = all_sum([loss / dist.world_size, *sums, *host], dist.device)
    loss, mlm_sum, nsp_sum, mlm_correct, nsp_correct, predictions, seqs, tokens, positions, digest = totals
    optimizer = engine.optimizer
    memory = (torch.cuda.max_memory_allocated(dist.device) if dist.device.type == "cuda"
              else psutil.Process().memory_info().rss) / 2**20
    tflops = flops_per_token * positions / seconds / 1e12  # every rank's positions in rank 0's window time
    record = {
        "loss": loss, "mlm_loss": mlm_sum / max(predictions, 1), "mlm_acc": mlm_correct / max(predictions, 1),
        "nsp_loss": nsp_sum / max(seqs, 1) if nsp else None,
        "nsp_acc": nsp_correct / max(seqs, 1) if nsp else None,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "loss_scale": float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 1.0)) or 1.0),
        "seq_per_s": seqs / seconds,
        "tokens_per_s": tokens / seconds,
        "tflops": tflops,
        "mfu": tflops / (peak * dist.world_size) if peak else None,
        "step_time_s": seconds / steps,
        "memory_mb": memory,
        "samples_digest": round(digest),  # sum of crc32s of the rows read: same data, same sum
        "window_tokens": tokens, "window_positions": positions,
    }
    return record


def _save(checkpoints: CheckpointManager, engine, step: int, loader: PretrainingLoader, cfg: PretrainConfig,
          dist: Dist, totals: dict | None = None) -> None:
    state = {"loader": loader.state_dict(), "totals": dict(totals or {})}  # no RNG state: dropout is seeded by
    # each micro-batch
    tag = checkpoints.save(engine, step, state, {"zero_stage": cfg.zero_stage, "precision": cfg.precision,
                                                 "global_batch": cfg.data.global_batch,
                                                 "micro_batch": cfg.data.micro_batch,
                                                 "shards_sha256": shards_digest(loader.shards)})
    log.info("saved checkpoint %s", tag)


def _fail_non_finite(step: int, loss: float, batch: dict, shards: ShardSet, checkpoints: CheckpointManager,
                     dist: Dist) -> None:
    rows = batch["rows"].tolist()
    shard, row = shards.locate(rows[0])
    last = checkpoints.latest() or "none yet"
    raise BertpipeError(f"non-finite loss ({loss}) at step {step} on rank {dist.rank}; the batch starts at "
                        f"{shard} row {row} ({len(rows)} rows); last good checkpoint: {last}")


def _latest_weights(model: BertForPreTraining, checkpoints: CheckpointManager) -> BertForPreTraining:
    """The latest checkpoint's fp32 weights (the optimizer's master copy, gathered from the ZeRO or bf16
    partitions, weights-only; `hf_interop.consolidated_state`) as one model. Rank 0, after every rank saved."""
    final = BertForPreTraining(model.config)
    final.load_state_dict(consolidated_state(checkpoints.root, checkpoints.latest()), strict=True)
    return final


def _export(engine, model: BertForPreTraining, cfg: PretrainConfig, checkpoints: CheckpointManager,
            dist: Dist) -> None:
    """Write the last checkpoint's fp32 weights in HF format to run_dir/export."""
    barrier()
    if not dist.main:
        return
    out = export_hf(_latest_weights(model, checkpoints), Path(cfg.run_dir) / "export", cfg.data.vocab_dir)
    log.info("exported fp32 weights of %s in HF format to %s", checkpoints.latest(), out)
