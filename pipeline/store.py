"""A directory on any fsspec filesystem where every file appears under its final name only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import BertpipeError


class Store:
    """Files under one root URL (local path, `memory://`, `s3://`...), written to `.tmp` names and moved."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            raise BertpipeError(f"cannot use output location {url}: {err}") from None
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        try:
            self.fs.makedirs(self.path(rel), exist_ok=True)
        except OSError as err:
            raise BertpipeError(f"cannot create {self.url}/{rel}: {err.strerror or err}") from None

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write `data` to `rel` through a temporary name; returns its sha256."""
        tmp = self.path(rel + ".tmp")
        try:
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, self.path(rel))
        except OSError as err:
            with contextlib.suppress(OSError):  # a full disk must not leave a half-written .tmp behind
                self.fs.rm(tmp)
            raise BertpipeError(f"cannot write {self.url}/{rel}: {err.strerror or err}") from None
        return hashlib.sha256(data).hexdigest()

    def write_json(self, rel: str, obj: object) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self.read_bytes(rel))
        except (OSError, ValueError):
            return None

    def listdir(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))

    def remove(self, rel: str = "") -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
