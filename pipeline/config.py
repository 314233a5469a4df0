"""YAML configs with `key=value` overrides, checked against a stage's config dataclass.

OmegaConf does the merging and type checking; this module only turns its errors into one line that names
the offending key, and resolves `${oc.env:DATA_DIR,...}`-style interpolations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

T = TypeVar("T")


def _overrides_to_dotlist(overrides: list[str]) -> list[str]:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:  # the value is read as YAML: brackets or braces inside it (a glob like wiki_0[0-9]) can break that
            yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override '{item}': its value is not valid YAML ({problem}); quote strings that "
                              "hold brackets, braces, ':' or ',', e.g. corpus.inputs=\"[{path: '/data/wiki_0[0-9]'}]\"",
                              ) from None
    return list(overrides)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def check_all(checks: list[tuple[bool, str]]) -> None:
    """A config dataclass's __post_init__ checks, (condition, message) pairs: the first that fails is raised as
    ValueError, which load_config turns into one line."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `overrides` (last wins)."""
    layers = [OmegaConf.structured(cls)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
        layers.append(OmegaConf.create(data))
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(_overrides_to_dotlist(overrides)))
        merged = OmegaConf.merge(*layers)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except (ValueError, TypeError) as err:  # raised by a dataclass's __post_init__ checks
        raise ConfigError(f"config: {err}") from None


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass, for manifests and logs."""
    return dataclasses.asdict(cfg)
