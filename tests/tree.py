"""A directory tree's fingerprint, to assert that a refused or failed command changed nothing it must not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(root: Path, *skip: str) -> dict[str, str]:
    """relative path -> sha256 of a file ("dir" for a directory, "-> target" for a link) for everything under
    `root`, except the top-level names in `skip` (an output's own temporary names) and what is under them."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames:
            path = Path(dirpath) / name
            out[str(rel / name)] = f"-> {os.readlink(path)}" if path.is_symlink() else "dir"
        for name in filenames:
            path = Path(dirpath) / name
            out[str(rel / name)] = (f"-> {os.readlink(path)}" if path.is_symlink()
                                    else hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What differs between two snapshots, one entry per path (empty when nothing changed)."""
    return [f"{'+' if k not in before else '-' if k not in after else '~'} {k}"
            for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
