"""Stage outputs: built under `<dir>.incomplete/`, renamed into place only when complete, with a manifest.

Every directory a stage writes holds `bertpipe.json` (the stage's name), written first. It is how bertpipe
recognises its own outputs: a stage replaces, resumes or removes only a directory that holds its marker (or,
for outputs written before markers existed, a manifest naming the stage); anything else at the path — a file,
a directory bertpipe did not write, another stage's output, a path under a file — stops it with one line, and
`--force` does not change that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from pipeline.errors import BertpipeError
from pipeline.store import Store

MANIFEST = "manifest.json"
MARKER = "bertpipe.json"  # {"stage": ...} in every directory a stage writes: what makes an output bertpipe's own


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a finished output directory, or None if there is none (or it is unreadable)."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def library_versions(*names: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("bertpipe", *names):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def owner(url: str | Path) -> str | None:
    """The stage that wrote the directory at `url` (its marker, else a manifest naming a stage), or None."""
    store = Store(str(url))
    for name in (MARKER, MANIFEST):
        data = store.read_json(name)
        if isinstance(data, dict) and isinstance(data.get("stage"), str):
            return data["stage"]
    return None


def claim(url: str | Path, stage: str) -> str:
    """What stands at `url`, where `stage` is about to write: "absent", "empty" (an empty directory) or "ours"
    (a directory this stage wrote). Anything else raises BertpipeError naming the path; nothing is touched."""
    store = Store(str(url))
    fs, root = store.fs, store.root
    try:
        if fs.isfile(root):
            raise BertpipeError(f"{url} is a file, not a {stage} output directory: bertpipe replaces only "
                                "outputs it wrote; choose another path or move the file away")
        if not fs.isdir(root):
            parent = str(url).rstrip("/").rpartition("/")[0]  # named as the user wrote it
            while parent and not parent.endswith(":/") and not fs.exists(Store(parent).root):
                parent = parent.rpartition("/")[0]
            if parent and fs.isfile(Store(parent).root):
                raise BertpipeError(f"cannot create {url}: {parent} is a file, not a directory")
            return "absent"
        if not fs.ls(root, detail=False):
            return "empty"
    except OSError as err:
        raise BertpipeError(f"cannot read {url}: {os_reason(err)}") from None
    found = owner(url)
    if found == stage:
        return "ours"
    if found:
        raise BertpipeError(f"{url} holds bertpipe's {found} output, not a {stage} output: choose another path")
    raise BertpipeError(f"{url} exists and was not written by bertpipe (no {MARKER} in it): bertpipe never "
                        "replaces a directory it did not make, even with --force; choose another path or move it away")


def claim_output(url: str | Path, stage: str) -> str:
    """`claim` an output and its temporary names (`<url>.incomplete`, `<url>.old`) before any work; returns
    what stands at the output itself."""
    for temporary in (".incomplete", ".old"):
        claim(f"{url}{temporary}", stage)
    return claim(url, stage)


def mark(url: str | Path, stage: str) -> None:
    """Write the marker that makes the directory at `url` a `stage` output (the directory must exist)."""
    Store(str(url)).write_json(MARKER, {"stage": stage, "bertpipe": library_versions().get("bertpipe"),
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def os_reason(err: OSError) -> str:
    """An OSError as one line: its reason and the file it concerns."""
    reason = err.strerror or str(err)
    return f"{reason} ({err.filename})" if err.filename else reason


def remove_own(url: str | Path, stage: str) -> None:
    """Remove the directory at `url` if this stage wrote it (or it is empty); refuse anything else."""
    if claim(url, stage) != "absent":
        Store(str(url)).remove()


@contextlib.contextmanager
def atomic_dir(final: str | Path, stage: str) -> Iterator[Path]:
    """Yield `<final>.incomplete/` (emptied first, marked as `stage`'s); on success swap it into `final`, else
    remove it. `final` (and its temporary names) may only be absent, empty or this stage's own output.

    An OSError inside (a read-only file system, a full disk) becomes one line naming the file."""
    final = Path(final)
    claim_output(final, stage)
    tmp = final.with_name(final.name + ".incomplete")
    remove_own(tmp, stage)
    try:
        tmp.mkdir(parents=True)
        mark(tmp, stage)
    except (OSError, BertpipeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os_reason(err) if isinstance(err, OSError) else str(err)
        raise BertpipeError(f"cannot create {tmp}: {reason}") from None
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertpipeError(f"cannot write {final}: {os_reason(err)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into(tmp, final, stage)


def swap_into(work: str | Path, final: str | Path, stage: str) -> None:
    """Put the finished directory `work` in place of `final` (any fsspec URL), which must be absent, empty or
    this stage's own: the old one is moved aside to `<final>.old` and removed once the new one is in place."""
    src, dst, old = Store(str(work)), Store(str(final)), Store(str(final) + ".old")
    remove_own(old.url, stage)
    try:
        if claim(final, stage) != "absent":
            dst.fs.mv(dst.root, old.root, recursive=True)
        src.fs.mv(src.root, dst.root, recursive=True)
        old.remove()
    except OSError as err:
        raise BertpipeError(f"cannot move {work} to {final}: {os_reason(err)}") from None
