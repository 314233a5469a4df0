"""Reading task files line by line, shared by every reader: one error line naming the file and line."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import BertpipeError


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline), gunzipped for `.gz`; a missing file, a broken gzip stream or
    invalid UTF-8 names the file and line."""
    if not path.is_file():
        raise BertpipeError(f"{path}: file not found (set task.data_dir or DATA_DIR)")
    number = 0
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
        try:
            for number, raw in enumerate(fh, 1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise BertpipeError(f"{path}:{number}: invalid UTF-8 at byte {err.start}") from None
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise BertpipeError(f"{path}:{number + 1}: cannot read: {err}") from None


def label_id(value: str, labels: tuple[str, ...], where: str) -> int:
    try:
        return labels.index(value)
    except ValueError:
        raise BertpipeError(f"{where}: unknown label {value!r} (expected one of {', '.join(labels)})") from None
