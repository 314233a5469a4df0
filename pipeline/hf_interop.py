"""Model weights on disk: bertpipe checkpoints, and HF transformers' format in both directions.

Both formats hold the same tensors under the same names (HF's), in safetensors; they differ only in the
config beside them. A bertpipe checkpoint is `model.safetensors` + `model_config.json` (bertpipe's
`BertConfig`, also kept in the safetensors metadata so a lone file describes itself); an HF directory is
`model.safetensors` + `config.json` (+ tokenizer files). Nothing is ever unpickled beyond tensors:
`pytorch_model.bin` files go through `torch.load(weights_only=True)`.

A pretraining run directory is read from its latest DeepSpeed checkpoint: the fp32 master weights, whichever
ZeRO stage and precision wrote them (`consolidated_state`), and the architecture from the run's
`model_config.json`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.artifacts import atomic_dir, claim_output, write_json
from pipeline.checkpoint import refused, scan, weights_only
from pipeline.errors import BertpipeError
from pipeline.model import BertConfig, BertForPreTraining
from pipeline.vocab import verify_vocab

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"  # bertpipe's BertConfig
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Names under which a tied tensor appears a second time; files store each tensor once, as HF's do.
TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}
# Parts a checkpoint may lack (BertModel has no heads, BertForMaskedLM no pooler or NSP head): initialized.
OPTIONAL_PREFIXES = ("bert.pooler.", "cls.")
# The model-states file DeepSpeed writes per checkpoint: ZeRO 0-2 (whole module), ZeRO-3 (rank 0's partition)
DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
COMPILED_PREFIX = "_orig_mod."  # what a torch.compile wrapper adds to every parameter name
HF_ONLY_FIELDS = {"model_type": "bert", "architectures": ["BertForPreTraining"], "hidden_act": "gelu",
                  "tie_word_embeddings": True}


# ---- configs ---------------------------------------------------------------------------------------------


def hf_config(config: BertConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of an HF `BertForPreTraining` with this architecture."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "gradient_checkpointing"}
    return fields | HF_ONLY_FIELDS | {"dtype": str(dtype).removeprefix("torch.")}


def _config_from_hf(data: dict, source: Path) -> BertConfig:
    """Our config from an HF config.json, refusing variants this model does not implement."""
    if data.get("model_type", "bert") != "bert":
        raise BertpipeError(f"{source}: model_type is {data['model_type']!r}, not 'bert'")
    unsupported = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False}
    for key, ours in unsupported.items():
        if data.get(key, ours) != ours:
            raise BertpipeError(f"{source}: {key}={data[key]!r} is not supported (bertpipe's BERT has {ours!r})")
    names = {f.name for f in dataclasses.fields(BertConfig)} - {"gradient_checkpointing"}
    return _make_config({k: v for k, v in data.items() if k in names and v is not None}, source)


def _make_config(fields: dict, source: Path | str) -> BertConfig:
    try:
        return BertConfig(**fields)
    except (TypeError, ValueError) as err:
        raise BertpipeError(f"{source}: bad model config: {err}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BertpipeError(f"{path}: cannot read: {err}") from None


def read_config(path: str | Path) -> BertConfig:
    """The architecture of a checkpoint: from the safetensors metadata bertpipe writes, else model_config.json,
    else an HF config.json beside the weights."""
    path = _resolve(path)
    if is_deepspeed_checkpoint(path):
        run_config = path.parent.parent / MODEL_CONFIG  # RUN_DIR/checkpoints/step-N -> RUN_DIR/model_config.json
        if not run_config.is_file():
            raise BertpipeError(f"{path}: a DeepSpeed checkpoint without {run_config} beside its run; cannot tell "
                                "the model's size")
        return _make_config(_read_json(run_config), run_config)
    weights = path if path.is_file() else path / WEIGHTS
    if weights.suffix == ".safetensors" and weights.is_file():
        try:
            with safe_open(str(weights), "pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as err:
            raise BertpipeError(f"{weights}: not a safetensors file: {err}") from None
        if "bertpipe_config" in meta:
            return _make_config(json.loads(meta["bertpipe_config"]), weights)
    if (weights.parent / MODEL_CONFIG).is_file():
        return _make_config(_read_json(weights.parent / MODEL_CONFIG), weights.parent / MODEL_CONFIG)
    if (weights.parent / HF_CONFIG).is_file():
        return _config_from_hf(_read_json(weights.parent / HF_CONFIG), weights.parent / HF_CONFIG)
    raise BertpipeError(f"{path}: no {MODEL_CONFIG} or {HF_CONFIG} beside the weights; cannot tell the model's size")


# ---- tensors ---------------------------------------------------------------------------------------------


def _resolve(path: str | Path) -> Path:
    """A weights file or a directory holding one; a pretraining run directory resolves to its latest checkpoint
    (`latest` or `checkpoints/latest`: a link to the step directory, or a file naming it)."""
    path = Path(path)
    if not path.exists():
        raise BertpipeError(f"checkpoint not found: {path}")
    for latest in (path / "latest", path / "checkpoints" / "latest"):
        if latest.is_dir():
            return latest.resolve()
        if latest.is_file():
            return latest.parent / latest.read_text().strip()
    return path


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise BertpipeError(f"{path}: not a loadable weights file: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BertpipeError(f"{path}: holds no flat state dict of tensors")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or directory (model.safetensors, sharded or not, or pytorch_model.bin)."""
    path = _resolve(path)
    if path.is_file():
        return _load_file(path)
    if is_deepspeed_checkpoint(path):
        return consolidated_state(path.parent, path.name)
    if (path / WEIGHTS).is_file():
        return _load_file(path / WEIGHTS)
    if (path / f"{WEIGHTS}.index.json").is_file():
        shards = sorted(set(_read_json(path / f"{WEIGHTS}.index.json")["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_file(path / shard).items()}
    if (path / "pytorch_model.bin").is_file():
        return _load_file(path / "pytorch_model.bin")
    raise BertpipeError(f"{path}: no {WEIGHTS} or pytorch_model.bin in it")


def _hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as BertForPreTraining names them, whatever BERT class or vintage wrote the file."""
    state = {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}  # saved from a torch.compile wrapper
    if not any(k.startswith(("bert.", "cls.")) for k in state):  # BertModel.save_pretrained: no prefix
        state = {f"bert.{k}": v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith((".position_ids", ".token_type_ids")):  # buffers older versions saved
            continue
        out[key] = value
    if "cls.predictions.bias" not in out and "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    for alias in TIED:
        out.pop(alias, None)
    return out


@dataclass
class LoadReport:
    source: str
    missing: list[str]  # in the model, not in the checkpoint: left at their initialization
    unexpected: list[str]  # in the checkpoint, not in the model (another task's head): ignored

    @property
    def initialized(self) -> list[str]:
        """The modules that were initialized rather than loaded, e.g. ['bert.pooler.dense', 'cls.seq_relationship']."""
        return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in self.missing))

    def __str__(self) -> str:
        parts = [f"loaded {self.source}"]
        if self.missing:
            parts.append(f"initialized (not in the checkpoint): {', '.join(self.initialized)}")
        if self.unexpected:
            parts.append(f"ignored (not in the model): {', '.join(self.unexpected)}")
        return "; ".join(parts)


def load_weights(model: BertForPreTraining, path: str | Path) -> LoadReport:
    """Copy a checkpoint's tensors into `model`; only the pooler and the heads may be missing.

    A tensor whose shape differs from the model's (another vocabulary or hidden size) is an error that names
    the key and both shapes, never a silent partial load.
    """
    state = _hf_names(read_state_dict(path))
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    wrong = [f"{k}: checkpoint has {tuple(state[k].shape)}, config expects {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise BertpipeError(f"{path}: shapes differ: {'; '.join(wrong[:3])}{more}")
    missing = [k for k in expected if k not in state]
    required = [k for k in missing if not k.startswith(OPTIONAL_PREFIXES)]
    if required:
        raise BertpipeError(f"{path}: not a BERT checkpoint for this model; it lacks {', '.join(required[:5])}"
                            + (f" and {len(required) - 5} more" if len(required) > 5 else ""))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadReport(str(path), missing, [k for k in state if k not in expected])


def load_hf(path: str | Path) -> tuple[BertForPreTraining, LoadReport]:
    """A model built from a checkpoint's own config with its weights loaded, and what was initialized instead.

    `path` is an HF BERT directory (saved from BertModel, BertForPreTraining or BertForMaskedLM) or a
    bertpipe checkpoint (file, directory, or a pretraining run directory).
    """
    model = BertForPreTraining(read_config(path))
    report = load_weights(model, path)
    if report.missing:
        log.info("%s", report)
    return model, report


# ---- DeepSpeed checkpoints -------------------------------------------------------------------------------


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in DS_MODEL_STATES)


@contextmanager
def _cpu_accelerator():
    """Reading checkpoint files needs no device (nor DeepSpeed's notice on stdout that it found none)."""
    unset = "DS_ACCELERATOR" not in os.environ
    if unset:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        if unset:
            del os.environ["DS_ACCELERATOR"]


def consolidated_state(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of DeepSpeed checkpoint `root/tag`, under HF's names (tied copies included).

    ZeRO 1-3: DeepSpeed's zero_to_fp32 gathers the fp32 partitions of every rank. ZeRO 0: the module as saved
    in fp32, or, under bf16/fp16 (where the saved module is in half precision), the optimizer's fp32 master
    copies, which follow the order of `BertForPreTraining.param_groups` (matrices first, then 1-D tensors).
    """
    directory = Path(root) / tag
    first = next((directory / n for n in DS_MODEL_STATES if (directory / n).is_file()), None)
    if first is None:
        raise BertpipeError(f"{directory}: not a DeepSpeed checkpoint (no {' or '.join(DS_MODEL_STATES)})")
    for path in sorted(directory.glob("*.pt")):  # refused before anything is unpickled, on every rank alike
        scan(path)
    try:
        with _cpu_accelerator(), weights_only():
            states = torch.load(first, map_location="cpu", weights_only=True)
            stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
            if stage > 0:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                with redirect_stdout(io.StringIO()):  # it prints its progress: keep stdout for results
                    state = dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
            else:
                state = _zero0_fp32(states, directory)
    except BertpipeError:
        raise
    except pickle.UnpicklingError as err:
        raise refused(directory, err) from None
    except Exception as err:  # a damaged or foreign file: DeepSpeed and torch raise many kinds
        raise BertpipeError(f"cannot read DeepSpeed checkpoint {directory}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
    state = _hf_names({k: v.float() for k, v in state.items()})
    for alias, source in TIED.items():
        if source in state:
            state[alias] = state[source]
    return state


def _zero0_fp32(states: dict, directory: Path) -> dict[str, torch.Tensor]:
    """ZeRO 0: the saved module under fp32; under bf16/fp16 the optimizer's fp32 copies, per parameter group
    (`fp32_groups`, DeepSpeed's unfused optimizer, as on the CPU) or one flat tensor per group
    (`fp32_groups_flat`, its fused one, as with FusedAdam on GPUs)."""
    module = states["module"]
    optimizer = states.get("optimizer") or {}
    if "fp32_groups" not in optimizer and "fp32_groups_flat" not in optimizer:  # fp32: the module is the master
        return dict(module)
    buffers = set(states.get("buffer_names") or [])
    names = [k for k in module if k not in TIED and k not in buffers]
    groups = [[k for k in names if module[k].dim() >= 2], [k for k in names if module[k].dim() < 2]]
    masters: dict[str, torch.Tensor] = {}
    if "fp32_groups" in optimizer:
        saved = optimizer["fp32_groups"]
        if [len(g) for g in saved] != [len(g) for g in groups]:
            raise BertpipeError(f"{directory}: the optimizer's fp32 copies do not match the module's parameters")
        for keys, tensors in zip(groups, saved, strict=True):
            masters.update(zip(keys, tensors, strict=True))
    else:
        for keys, flat in zip(groups, optimizer["fp32_groups_flat"], strict=True):
            sizes = [module[k].numel() for k in keys]
            if sum(sizes) > flat.numel():
                raise BertpipeError(f"{directory}: the optimizer's fp32 copies do not match the module's parameters")
            masters.update(zip(keys, flat[: sum(sizes)].split(sizes), strict=True))
    if any(masters[k].numel() != module[k].numel() for k in masters):
        raise BertpipeError(f"{directory}: the optimizer's fp32 copies do not match the module's parameters")
    return dict(module) | {k: v.reshape(module[k].shape) for k, v in masters.items()}


# ---- writing ---------------------------------------------------------------------------------------------


def _tensors(model: BertForPreTraining) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED}


def _save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)


def save_model(model: BertForPreTraining, directory: str | Path) -> Path:
    """Write a bertpipe checkpoint (model.safetensors + model_config.json) into `directory`, file by file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(model.config)
    _save_weights(_tensors(model), directory / WEIGHTS, {"bertpipe_config": json.dumps(config)})
    write_json(directory / MODEL_CONFIG, config)
    return directory


def _vocab_size(vocab_dir: Path) -> int:
    vocab = vocab_dir / "vocab.txt"
    if not vocab.is_file():
        raise BertpipeError(f"{vocab_dir}: no vocab.txt (run `bertpipe vocab` first)")
    verify_vocab(vocab_dir)
    return len(vocab.read_text(encoding="utf-8").splitlines())


def export_hf(
    source: BertForPreTraining | str | Path, out_dir: str | Path, vocab_dir: str | Path | None = None
) -> Path:
    """Write `out_dir` in HF format, loadable with `transformers.BertForPreTraining.from_pretrained`.

    `source` is a model or a checkpoint path. With `vocab_dir`, its tokenizer files are copied so the
    directory also loads with `BertTokenizerFast`; its size must match the model's vocabulary. The directory
    is built beside `out_dir` and renamed into place, so a failed export leaves nothing half-written; `out_dir`
    may only be absent, empty or an earlier export (anything else is refused before any work).
    """
    claim_output(out_dir, "export")
    model = source if isinstance(source, BertForPreTraining) else load_hf(source)[0]
    if vocab_dir is not None:
        vocab_dir = Path(vocab_dir)
        size = _vocab_size(vocab_dir)
        if size != model.config.vocab_size:
            raise BertpipeError(f"{vocab_dir} has {size} tokens, the model's vocabulary {model.config.vocab_size}")
    tensors = _tensors(model)
    with atomic_dir(out_dir, "export") as tmp:
        dtype = tensors["bert.embeddings.word_embeddings.weight"].dtype
        write_json(tmp / HF_CONFIG, hf_config(model.config, dtype))
        _save_weights(tensors, tmp / WEIGHTS, {})
        for name in TOKENIZER_FILES if vocab_dir is not None else ():
            if (vocab_dir / name).is_file():
                shutil.copy2(vocab_dir / name, tmp / name)
    return Path(out_dir)
