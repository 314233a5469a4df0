"""One log format for every stage, and progress bars that `--quiet` turns off."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_quiet = False


def setup_logging(quiet: bool = False, level: int = logging.INFO) -> None:
    """Configure the root logger once; `quiet` keeps warnings and errors and hides progress bars."""
    global _quiet
    _quiet = quiet or os.environ.get("BERTPIPE_QUIET") == "1"
    logging.basicConfig(
        format=FORMAT, datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr,
        level=logging.WARNING if _quiet else level, force=True,
    )


def progress(iterable: Iterable[T] | None = None, disable: bool = False, **kwargs) -> Iterator[T] | tqdm:
    """A tqdm bar on stderr, hidden under --quiet or when stderr is not a terminal and nobody asked."""
    disable = disable or _quiet or (not sys.stderr.isatty() and os.environ.get("BERTPIPE_PROGRESS") != "1")
    return tqdm(iterable, disable=disable, dynamic_ncols=True, mininterval=1.0, **kwargs)
