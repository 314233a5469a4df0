"""The pretrain stage: BERT MLM + NSP in a plain loop around a DeepSpeed engine.

One code path for the CPU (gloo) and GPUs (NCCL), launched by torchrun, the deepspeed launcher, srun or as a
single process. ZeRO, mixed precision, gradient accumulation and clipping are DeepSpeed's, configured from
the YAML (a DeepSpeed JSON may be merged on top). The loop, in the order one would explain it: resume →
for each step: micro-batches (forward, backward) → optimizer step → NaN check → log → eval → checkpoint →
stop on SIGTERM/SIGUSR1 → at the end consolidate fp32 weights and export HF format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import yaml
from tokenizers import Tokenizer

from pipeline.artifacts import claim, mark, os_reason, owner, sha256_json, write_json
from pipeline.checkpoint import CheckpointManager
from pipeline.collate import MaskingConfig, MLMCollator, continuation_flags
from pipeline.config import check_all, to_dict
from pipeline.dataset import PretrainingLoader, ShardSet
from pipeline.distributed import Dist, agree, all_mean, any_rank, barrier, init_distributed
from pipeline.errors import BertpipeError
from pipeline.hf_interop import MODEL_CONFIG, consolidated_state, export_hf, load_weights, read_config
from pipeline.log import progress
from pipeline.model import PRESETS, BertForPreTraining, from_preset
from pipeline.resume import check_resumable, config_changes
from pipeline.schedule import warmup_decay
from pipeline.tracking import TrackConfig, Tracker, trim_metrics
from pipeline.vocab import load_vocab, vocab_hash
from tokenization import SpecialIds, special_ids

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun the same command to resume
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_labels", "next_sentence_label")
FLOP_CONVENTION = ("6 x encoder parameters + 12 x layers x hidden x seq (attention) per token, plus the MLM "
                   "transform and decoder on the masked positions only; forward + backward; padded positions count")
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


@dataclass
class ModelArgs:
    preset: str = "tiny"  # tiny | mini | small | medium | base | large
    init_from: str | None = None  # phase 2: a pretrain run dir, an HF BERT dir or a checkpoint (weights only)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (GPUs; slow to start)
    dropout: float = 0.1
    max_positions: int = 512  # learned position embeddings: the longest sequence the model takes


@dataclass
class DataArgs:
    shards: str = "build/shards"
    vocab_dir: str = "build/vocab"
    eval_shards: int = 1  # the last N shards are held out for evaluation
    micro_batch: int = 32  # sequences per rank per forward pass
    global_batch: int = 256  # sequences per optimizer step over all ranks (gradient accumulation fills the gap)
    loader_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 10_000
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(max_predictions=0))


@dataclass
class OptimArgs:
    name: str = "adamw"  # adamw | lamb (LAMB is DeepSpeed's fused kernel: GPUs only)
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | poly (decay to min_lr after warmup)
    power: float = 1.0  # for poly
    min_lr: float = 0.0
    grad_clip: float = 1.0


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
    eval_batches: int = 20  # micro-batches per rank per evaluation
    checkpoint_every: int = 500  # steps; 0 = only at the end and on a signal
    keep_checkpoints: int = 3
    seed: int = 1234
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look it up (GPU) or estimate it (CPU)
    export: bool = True  # write run_dir/export in HF format at the end

    def __post_init__(self) -> None:
        checks = [
            (self.model.preset in PRESETS, f"model.preset must be one of {', '.join(PRESETS)}"),
            (self.precision in ("fp32", "bf16", "fp16"), "precision must be fp32, bf16 or fp16"),
            (0 <= self.zero_stage <= 3, "zero_stage must be 0, 1, 2 or 3"),
            (self.optim.name in ("adamw", "lamb"), "optim.name must be adamw or lamb"),
            (self.optim.schedule in ("linear", "poly"), "optim.schedule must be linear or poly"),
            (self.max_steps > 0 and self.data.micro_batch > 0, "max_steps and data.micro_batch must be positive"),
        ]
        check_all(checks)


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to the peak, then linear or polynomial decay to min_lr at max_steps (as a factor)."""
    o = cfg.optim
    return warmup_decay(step, o.warmup_steps, cfg.max_steps, 1.0 if o.schedule == "linear" else o.power,
                        o.min_lr / o.lr)


def deepspeed_config(cfg: PretrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config generated from the YAML, with a user JSON (if any) merged on top."""
    per_step = cfg.data.micro_batch * world_size
    if cfg.data.global_batch % per_step:
        raise BertpipeError(f"data.global_batch {cfg.data.global_batch} is not a multiple of micro_batch x ranks "
                            f"= {cfg.data.micro_batch} x {world_size}")
    if cfg.optim.name == "lamb" and not on_gpu:
        raise BertpipeError("optim.name=lamb needs a GPU (DeepSpeed's fused LAMB); use adamw on the CPU")
    if cfg.precision == "fp16" and not on_gpu:
        raise BertpipeError("precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    o = cfg.optim
    params = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.optim.name == "lamb":
        optimizer = {"type": "Lamb", "params": params}
    elif on_gpu:
        optimizer = {"type": "Adam", "params": {**params, "adam_w_mode": True}}  # DeepSpeed's fused AdamW
    else:
        optimizer = {"type": "AdamW", "params": {**params, "torch_adam": True}}  # no C++ build on the CPU
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": cfg.data.global_batch // per_step,
        "train_batch_size": cfg.data.global_batch,
        "gradient_clipping": o.grad_clip,
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


def _accuracy(out, batch) -> tuple[float, float]:
    labels = batch["mlm_labels"]
    valid = labels != -100
    mlm = (out.mlm_logits.argmax(-1)[valid] == labels[valid]).float().mean().item() if valid.any() else 0.0
    nsp = (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).float().mean().item()
    return mlm, nsp


@dataclass
class _Setup:
    """What the checks before step 1 found: verified inputs, the model, and the checkpoint to resume from."""
    tokenizer: Tokenizer
    special: SpecialIds
    every: ShardSet
    held: int  # the last `held` shards are for evaluation
    model: BertForPreTraining
    ds_config: dict
    tag: str | None = None  # the checkpoint to resume from
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
    n_shards = len(every.shards)
    if cfg.eval_every and not 0 < cfg.data.eval_shards < n_shards:
        raise BertpipeError(f"data.eval_shards={cfg.data.eval_shards} must leave training shards "
                            f"(there are {n_shards}); set eval_every=0 to skip evaluation")
    every.check_files(range(dist.rank, n_shards, dist.world_size))  # the ranks share the hashing
    ds_config = deepspeed_config(cfg, dist.world_size, dist.device.type == "cuda")
    model = _build_model(cfg, special.vocab_size, every.max_seq_len)
    setup = _Setup(tokenizer, special, every, cfg.data.eval_shards if cfg.eval_every else 0, model, ds_config)
    setup.tag = checkpoints.latest() if state == "ours" else None
    if setup.tag:
        meta = checkpoints.check(setup.tag, dist.world_size, cfg.zero_stage)
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


def _rebase_schedule(scheduler, cfg: PretrainConfig) -> None:
    """Put this config's LR schedule on the restored scheduler: load_checkpoint brings back the base LR it was
    saved with, which would silently override a changed optim.lr (the other schedule keys act through
    lr_factor). With an unchanged config this recomputes the very same LR."""
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = cfg.optim.lr
        group["lr"] = cfg.optim.lr * lr_factor(scheduler.last_epoch, cfg)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def pretrain(cfg: PretrainConfig) -> int:
    """Run (or resume) pretraining in `cfg.run_dir`; returns 0 when done, EXIT_PREEMPTED after a signal."""
    dist = init_distributed()
    torch.manual_seed(cfg.seed + dist.rank)
    run_dir = Path(cfg.run_dir)
    checkpoints = CheckpointManager(run_dir, cfg.keep_checkpoints, dist.rank, dist.world_size)
    setup = agree(lambda: _preflight(cfg, dist, checkpoints))  # bad input: one line from rank 0, nothing written

    tokenizer, special, every, held = setup.tokenizer, setup.special, setup.every, setup.held
    n_shards = len(every.shards)
    train_set = ShardSet(cfg.data.shards, shards=list(range(n_shards - held)))
    max_len = every.max_seq_len
    masking = cfg.data.masking
    if masking.max_predictions == 0:  # BERT's: 20 at seq 128, 80 at 512
        masking = MaskingConfig(**{**to_dict(masking), "max_predictions": round(max_len * 5 / 32)})
    collator = MLMCollator(special, masking, continuation_flags(tokenizer) if masking.whole_word else None)
    loader = PretrainingLoader(train_set, collator, cfg.data.micro_batch, rank=dist.rank,
                               world_size=dist.world_size, workers=cfg.data.loader_workers, seed=cfg.seed,
                               shuffle_buffer=cfg.data.shuffle_buffer)

    model = setup.model
    if cfg.model.compile:  # in place: parameter names (and so checkpoints) keep no `_orig_mod.` prefix
        model.compile()
    ds_config = setup.ds_config
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.param_groups(cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)),
    )
    step = 0
    tag = setup.tag
    if tag:
        state = agree(lambda: checkpoints.load(engine, tag))
        step = state["step"]
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        if dist.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        _rebase_schedule(scheduler, cfg)
        log.info("resumed from %s at step %d%s", tag, step, "; changed: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in setup.changes.items()) if setup.changes else "")
    agree(lambda: _start_run_dir(cfg, setup) if dist.main else None)  # written only once the checkpoint loaded

    peak, peak_source = peak_tflops(cfg, dist.device)
    tracker = Tracker(run_dir, cfg.track, to_dict(cfg), enabled=dist.main)
    if dist.main and step == 0:
        tracker.log({"flop_convention": FLOP_CONVENTION, "peak_tflops": peak, "peak_source": peak_source,
                     "world_size": dist.world_size, "deepspeed": ds_config}, step, event="start")
    elif dist.main:  # the resume, with every config change it applies: the run's history of settings
        tracker.log({"checkpoint": tag, "world_size": dist.world_size,
                     "changes": {k: list(v) for k, v in setup.changes.items()}}, step, event="resume")
    flops_per_token = model.flops_per_token(max_len, masking.mlm_probability)
    stop = _Stop()
    grad_accum = ds_config["gradient_accumulation_steps"]
    batches = iter(loader)
    bar = progress(total=cfg.max_steps, initial=step, unit="step", desc="pretrain", disable=not dist.main)
    window = {"loss": 0.0, "mlm_loss": 0.0, "nsp_loss": 0.0, "mlm_acc": 0.0, "nsp_acc": 0.0, "n": 0,
              "steps": 0, "seqs": 0, "tokens": 0, "positions": 0, "time": 0.0, "digest": 0}
    grad_norm = None
    preempted = False
    try:
        while step < cfg.max_steps:
            start = time.perf_counter()
            step_losses = []
            for _ in range(grad_accum):
                batch = next(batches)
                inputs = {k: batch[k].to(dist.device) for k in MODEL_INPUTS}
                out = engine(**inputs)
                engine.backward(out.loss)
                boundary = engine.is_gradient_accumulation_boundary()
                unsharded_norm = _param_grad_norm(engine) if boundary and cfg.zero_stage == 0 else None
                engine.step()
                if boundary:  # ZeRO optimizers compute the norm inside step()
                    grad_norm = unsharded_norm if cfg.zero_stage == 0 else engine.get_global_grad_norm()
                step_losses.append(out.loss.detach().float())
                mlm_acc, nsp_acc = _accuracy(out, inputs)
                window["mlm_loss"] += out.mlm_loss.item()
                window["nsp_loss"] += out.nsp_loss.item()
                window["digest"] += zlib.crc32(batch["rows"].numpy().tobytes())
                window["mlm_acc"] += mlm_acc
                window["nsp_acc"] += nsp_acc
                window["n"] += 1
                window["seqs"] += inputs["input_ids"].shape[0]
                window["tokens"] += int(inputs["attention_mask"].sum())
                window["positions"] += inputs["input_ids"].numel()
            loss = float(torch.stack(step_losses).mean())
            if any_rank(not math.isfinite(loss), dist.device):
                _fail_non_finite(step + 1, loss, batch, train_set, checkpoints, dist)
            step += 1
            window["loss"] += loss
            window["steps"] += 1
            window["time"] += time.perf_counter() - start
            bar.update()
            if step % cfg.track.log_every == 0 or step == cfg.max_steps:
                record = _train_record(window, engine, dist, flops_per_token, peak, grad_norm)
                tracker.log(record, step)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                window = dict.fromkeys(window, 0.0)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                tracker.log(evaluate(engine, cfg, every, n_shards - held, collator, dist), step, event="eval")
            signalled = any_rank(stop.signal is not None, dist.device)
            if signalled or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                _save(checkpoints, engine, step, loader, cfg, dist)
            if signalled and step < cfg.max_steps:
                log.warning("stopped by a signal at step %d after a checkpoint; rerun to resume", step)
                preempted = True
                break
    finally:
        bar.close()
        tracker.close()
    if preempted:
        return EXIT_PREEMPTED
    if cfg.export:
        _export(engine, model, cfg, checkpoints, dist)
    barrier()
    return 0


def _param_grad_norm(engine) -> float | None:
    """The gradient norm before clipping under ZeRO stage 0, whose gradients are whole on every rank
    (ZeRO's optimizers compute it themselves: engine.get_global_grad_norm())."""
    grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


def _train_record(window: dict, engine, dist: Dist, flops_per_token: float, peak: float,
                  grad_norm: float | None) -> dict:
    n, steps, seconds = max(window["n"], 1), max(window["steps"], 1), max(window["time"], 1e-9)
    losses = all_mean([window["loss"] / steps, window["mlm_loss"] / n, window["nsp_loss"] / n,
                       window["mlm_acc"] / n, window["nsp_acc"] / n, window["digest"]], dist.device)
    seq_per_s = window["seqs"] / seconds * dist.world_size
    tflops = flops_per_token * window["positions"] / seconds * dist.world_size / 1e12
    optimizer = engine.optimizer
    memory = (torch.cuda.max_memory_allocated(dist.device) if dist.device.type == "cuda"
              else psutil.Process().memory_info().rss) / 2**20
    return {
        "loss": losses[0], "mlm_loss": losses[1], "nsp_loss": losses[2], "mlm_acc": losses[3], "nsp_acc": losses[4],
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "loss_scale": float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 1.0)) or 1.0),
        "seq_per_s": seq_per_s,
        "tokens_per_s": window["tokens"] / seconds * dist.world_size,
        "tflops": tflops,
        "mfu": tflops / (peak * dist.world_size) if peak else None,
        "step_time_s": seconds / steps,
        "memory_mb": memory,
        "samples_digest": round(losses[5] * dist.world_size),  # sum of crc32s of the rows read: same data, same sum
    }


@torch.no_grad()
def evaluate(engine, cfg: PretrainConfig, every: ShardSet, first_eval_shard: int, collator: MLMCollator,
             dist: Dist) -> dict:
    """MLM loss and accuracy, NSP accuracy on the held-out shards (the same batches every time)."""
    held = ShardSet(cfg.data.shards, shards=list(range(first_eval_shard, len(every.shards))))
    loader = PretrainingLoader(held, collator, cfg.data.micro_batch, rank=dist.rank, world_size=dist.world_size,
                               workers=0, seed=cfg.seed + 1, shuffle_buffer=1, epochs=1)
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    n = 0
    for batch in loader:
        inputs = {k: batch[k].to(dist.device) for k in MODEL_INPUTS}
        out = engine(**inputs)
        mlm_acc, nsp_acc = _accuracy(out, inputs)
        for i, v in enumerate((float(out.mlm_loss), float(out.nsp_loss), mlm_acc, nsp_acc)):
            sums[i] += v
        n += 1
        if n == cfg.eval_batches:
            break
    engine.train()
    mlm_loss, nsp_loss, mlm_acc, nsp_acc = all_mean([s / max(n, 1) for s in sums], dist.device)
    return {"mlm_loss": mlm_loss, "nsp_loss": nsp_loss, "loss": mlm_loss + nsp_loss, "mlm_acc": mlm_acc,
            "nsp_acc": nsp_acc, "batches": n}


def _save(checkpoints: CheckpointManager, engine, step: int, loader: PretrainingLoader, cfg: PretrainConfig,
          dist: Dist) -> None:
    state = {"loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}
    if dist.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(dist.device)
    tag = checkpoints.save(engine, step, state, {"zero_stage": cfg.zero_stage, "precision": cfg.precision,
                                                 "shards_sha256": shards_digest(loader.shards)})
    log.info("saved checkpoint %s", tag)


def _fail_non_finite(step: int, loss: float, batch: dict, shards: ShardSet, checkpoints: CheckpointManager,
                     dist: Dist) -> None:
    rows = batch["rows"].tolist()
    shard, row = shards.locate(rows[0])
    last = checkpoints.latest() or "none yet"
    raise BertpipeError(f"non-finite loss ({loss}) at step {step} on rank {dist.rank}; the batch starts at "
                        f"{shard} row {row} ({len(rows)} rows); last good checkpoint: {last}")


def _export(engine, model: BertForPreTraining, cfg: PretrainConfig, checkpoints: CheckpointManager,
            dist: Dist) -> None:
    """Write the last checkpoint's fp32 weights (the optimizer's master copy, gathered from the ZeRO or bf16
    partitions; `hf_interop.consolidated_state`) in HF format."""
    barrier()
    if not dist.main:
        return
    tag = checkpoints.latest()
    final = BertForPreTraining(model.config)
    final.load_state_dict(consolidated_state(checkpoints.root, tag), strict=True)
    out = export_hf(final, Path(cfg.run_dir) / "export", cfg.data.vocab_dir)
    log.info("exported fp32 weights of %s in HF format to %s", tag, out)
