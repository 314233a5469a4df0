"""Corpus readers: WikiExtractor and JSON-lines Wikipedia, Gutenberg-style books, plain text, HF `datasets`
(a `save_to_disk` directory, or Arrow/Parquet files), and the documentation every Python ships (the embedded
default).

Any fsspec path or glob works (local, `memory://`, `s3://`, `gs://`), compressed files are read through
fsspec's codecs by their suffix, and everything is streamed a chunk at a time in a fixed order: sorted
files, documents in file order. Shared by the vocab and shard stages.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from pipeline.errors import BertpipeError

log = logging.getLogger(__name__)

FORMATS = ("auto", "wikiextractor", "jsonl", "book", "plain", "pydoc", "hf")
HF_SUFFIXES = (".arrow", ".parquet")  # the files of an HF dataset: save_to_disk writes Arrow, to_parquet Parquet
HF_BATCH = 1000  # rows per batch streamed from a dataset file
PYDOC = "pydoc"  # the path (and format) of the embedded corpus: Python's own documentation
_CHUNK = 1 << 20
# characters: a paragraph this long is no paragraph (the longest in the Wikipedia sample has 6,251): likely a
# file whose line breaks were lost, which starves the vocabulary and yields almost no pretraining instances
LONG_PARAGRAPH = 100_000
_warned: set[str] = set()  # files already warned about, in this process
_DOC_OPEN = re.compile(r'^<doc id="([^"]*)" url="([^"]*)" title="([^"]*)">\s*$')
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)


@dataclass
class CorpusInput:
    path: str = PYDOC  # fsspec path, glob or directory; `pydoc` is the embedded default
    format: str = "auto"  # one of FORMATS; auto: .jsonl/.json -> jsonl, .arrow/.parquet or a saved dataset -> hf,
    # `<doc ` first -> wikiextractor, else plain
    text_column: str = "text"  # format hf: the column holding a document's text
    id_column: str | None = None  # format hf: a column of document ids (default: <file name>:<row>)
    title_column: str | None = None  # format hf: a column of titles (metadata, not part of the text)
    split: str = "train"  # format hf: the split to read from a DatasetDict saved with save_to_disk


@dataclass
class CorpusConfig:
    inputs: list[CorpusInput] = field(default_factory=lambda: [CorpusInput()])
    encoding_errors: str = "strict"  # strict: invalid UTF-8 is an error; replace: U+FFFD, counted and logged

    def __post_init__(self) -> None:
        if self.encoding_errors not in ("strict", "replace"):
            raise ValueError(f"corpus.encoding_errors must be strict or replace, not {self.encoding_errors!r}")
        for spec in self.inputs:
            if spec.format not in FORMATS:
                raise ValueError(f"corpus format {spec.format!r} is not one of {', '.join(FORMATS)}")
        if not self.inputs:
            raise ValueError("corpus.inputs is empty")


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    title: str
    text: str  # paragraphs separated by "\n"


@dataclass(frozen=True)
class CorpusFile:
    path: str  # full fsspec URL, protocol included for non-local files
    format: str
    size: int
    spec: CorpusInput | None = field(default=None, compare=False, hash=False, repr=False)  # columns (format hf)


class CorpusError(BertpipeError):
    pass


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _resolve(spec: CorpusInput) -> list[CorpusFile]:
    if spec.path == PYDOC or spec.format == PYDOC:
        size = sum(len(t.encode()) for t in _pydoc_topics().values())
        return [CorpusFile(PYDOC, PYDOC, size)]
    try:
        fs, root = fsspec.core.url_to_fs(spec.path)
    except (ImportError, ValueError) as err:
        raise CorpusError(f"cannot open corpus path {spec.path}: {err}") from None
    fmt = spec.format
    if fsspec.core.has_magic(root):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not paths:
            raise CorpusError(f"corpus glob matches no files: {spec.path}")
    elif fs.isdir(root):
        saved = _saved_dataset_files(fs, root, spec) if fmt in ("auto", "hf") else None
        if saved is not None:
            paths, fmt = saved, "hf"
        else:
            paths = sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith("."))
            if fmt == "hf":
                paths = [p for p in paths if p.endswith(HF_SUFFIXES)]
        if not paths:
            raise CorpusError(f"corpus directory is empty: {spec.path}" if fmt != "hf" else
                              f"no .arrow or .parquet files (nor a dataset saved with save_to_disk) in {spec.path}")
    elif fs.isfile(root):
        paths = [root]
    else:
        raise CorpusError(f"corpus path does not exist: {spec.path}")
    local = isinstance(fs, LocalFileSystem)
    return [CorpusFile(p if local else fs.unstrip_protocol(p),
                       "hf" if fmt == "auto" and p.endswith(HF_SUFFIXES) else fmt, int(fs.size(p) or 0), spec)
            for p in paths]


def _saved_dataset_files(fs, root: str, spec: CorpusInput) -> list[str] | None:
    """The Arrow files of a directory written by `Dataset.save_to_disk` (or a DatasetDict's `spec.split`), in
    their order; None when the directory is not a saved dataset."""
    if fs.isfile(f"{root}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json")).get("splits", [])
        if spec.split not in splits:
            raise CorpusError(f"{spec.path}: a DatasetDict without the split {spec.split!r} (it has "
                              f"{', '.join(splits) or 'none'}; set the input's split)")
        root = f"{root}/{spec.split}"
    if not fs.isfile(f"{root}/state.json"):
        return None
    state = json.loads(fs.cat_file(f"{root}/state.json"))
    return [f"{root}/{f['filename']}" for f in state.get("_data_files", [])]


class Corpus:
    """The documents of every input, in a fixed order; counts decode replacements as it goes."""

    def __init__(self, config: CorpusConfig):
        self.config = config
        self.replaced_chars = 0
        self.documents_read = 0
        self._files: list[CorpusFile] | None = None

    def files(self) -> list[CorpusFile]:
        if self._files is None:
            self._files = [f for spec in self.config.inputs for f in _resolve(spec)]
        return self._files

    def documents(self) -> Iterator[Document]:
        """Every document of every file; raises CorpusError if there are none at all."""
        self.documents_read = 0
        for f in self.files():
            for doc in self.read_file(f):
                self.documents_read += 1
                _warn_long(doc)
                yield doc
        if self.documents_read == 0:
            raise CorpusError(f"corpus is empty: {len(self.files())} file(s) and no text in them")
        if self.replaced_chars:
            log.warning("replaced %d invalid UTF-8 sequence(s) with U+FFFD", self.replaced_chars)

    def read_file(self, f: CorpusFile) -> Iterator[Document]:
        if f.format == PYDOC:
            yield from _read_pydoc()
            return
        if f.format == "hf":
            yield from _read_hf(f)
            return
        lines = self._lines(f.path)
        fmt = f.format
        if fmt == "auto":
            fmt, lines = _sniff(f.path, lines)
        reader = {"wikiextractor": _read_wikiextractor, "jsonl": _read_jsonl, "book": _read_book,
                  "plain": _read_plain}[fmt]
        yield from reader(f.path, lines)

    def fingerprint(self) -> list[dict]:
        """Path, size and sha256 of each input file as stored (compressed bytes for compressed files)."""
        out = []
        for f in self.files():
            digest = hashlib.sha256()
            if f.path == PYDOC:
                for key in sorted(_pydoc_topics()):
                    digest.update(_pydoc_topics()[key].encode())
            else:
                with fsspec.open(f.path, "rb") as fh:
                    while block := fh.read(_CHUNK):
                        digest.update(block)
            out.append({"path": f.path, "format": f.format, "size": f.size, "sha256": digest.hexdigest()})
        return out

    def _lines(self, path: str) -> Iterator[str]:
        """Decoded lines without their newline, streamed in 1 MiB chunks; invalid UTF-8 names the byte."""
        strict = self.config.encoding_errors == "strict"
        try:
            handle = fsspec.open(path, "rb", compression=infer_compression(path))
            fh = handle.open()
        except (OSError, ValueError) as err:
            raise CorpusError(f"cannot open {path}: {err}") from None
        with fh:
            offset, rest, first = 0, b"", True
            while True:
                try:
                    block = fh.read(_CHUNK)
                except (OSError, EOFError, ValueError) as err:
                    raise CorpusError(f"cannot read {path}: {err}") from None
                if first:
                    if b"\x00" in block[:8192]:
                        raise CorpusError(f"{path} is a binary file, not text (NUL byte in its first 8 KiB)")
                    if block.startswith(b"\xef\xbb\xbf"):
                        block, offset = block[3:], 3
                    first = False
                if not block:
                    break
                parts = (rest + block).split(b"\n")
                rest = parts.pop()
                for raw in parts:
                    yield self._decode(raw, path, offset, strict)
                    offset += len(raw) + 1
            if rest:
                yield self._decode(rest, path, offset, strict)

    def _decode(self, raw: bytes, path: str, offset: int, strict: bool) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if strict:
                raise CorpusError(
                    f"{path}: invalid UTF-8 at byte offset {offset + err.start} "
                    "(set corpus.encoding_errors=replace to replace and count instead)"
                ) from None
            text = raw.decode("utf-8", "replace")
            self.replaced_chars += text.count("\ufffd") - raw.count("\ufffd".encode())
        return text.rstrip("\r")


def _warn_long(doc: Document) -> None:
    """Warn, once per file, about a document holding a paragraph far beyond any real one."""
    if len(doc.text) <= LONG_PARAGRAPH or doc.source in _warned:
        return
    longest = max(map(len, doc.text.split("\n")))
    if longest > LONG_PARAGRAPH:
        _warned.add(doc.source)
        log.warning("%s: document %s holds a paragraph of %s characters without a line break, far beyond any real "
                    "paragraph (were the file's line breaks lost?); text like it gives a poor vocabulary and almost "
                    "no pretraining instances", doc.source, doc.id, f"{longest:,}")


def _sniff(path: str, lines: Iterator[str]) -> tuple[str, Iterator[str]]:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json")):
        return "jsonl", lines
    head = next(lines, None)
    if head is None:
        return "plain", iter(())

    def chained() -> Iterator[str]:
        yield head
        yield from lines

    return ("wikiextractor" if head.startswith("<doc ") else "plain"), chained()


def _read_wikiextractor(path: str, lines: Iterator[str]) -> Iterator[Document]:
    """`<doc id url title>`, the title repeated as the first line (metadata, dropped), then paragraphs."""
    header, body = None, []
    for lineno, line in enumerate(lines, 1):
        if header is None:
            if not line.strip():
                continue
            m = _DOC_OPEN.match(line)
            if m is None:
                raise CorpusError(f"{path}:{lineno}: expected a WikiExtractor <doc ...> line, got {line[:60]!r}")
            header, body = m, []
        elif line.startswith("</doc>"):
            doc_id, _, title = (html.unescape(g) for g in header.groups())
            if body and body[0].strip() == title.strip():
                body = body[1:]
            text = "\n".join(p for p in (b.strip() for b in body) if p)
            if text:
                yield Document(doc_id, path, title, text)
            header = None
        else:
            body.append(line)
    if header is not None:
        raise CorpusError(f"{path}: document {header.group(1)!r} has no closing </doc> (truncated file?)")


def _read_jsonl(path: str, lines: Iterator[str]) -> Iterator[Document]:
    """One JSON object a line with `text` and optionally `id` and `title`."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorpusError(f"{path}:{lineno}: not a JSON object with a 'text' field") from None
        text = "\n".join(p for p in (s.strip() for s in str(text).split("\n")) if p)
        if text:
            yield Document(str(obj.get("id", lineno)), path, str(obj.get("title", "")), text)


def _paragraphs(lines: Iterator[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.strip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def _read_plain(path: str, lines: Iterator[str]) -> Iterator[Document]:
    """Documents separated by blank lines; each line of a document is a paragraph."""
    stem = path.rsplit("/", 1)[-1]
    for i, block in enumerate(_paragraphs(lines)):
        yield Document(f"{stem}:{i}", path, "", "\n".join(block))


def strip_gutenberg(lines: list[str]) -> list[str]:
    """Drop a Project Gutenberg header (up to its START line) and footer (from its END line on)."""
    start = next((i + 1 for i, line in enumerate(lines[:400]) if _GUTENBERG_START.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if _GUTENBERG_END.match(lines[i])), len(lines))
    return lines[start:end]


def _read_book(path: str, lines: Iterator[str]) -> Iterator[Document]:
    """A whole book as one document: wrapped lines joined, one paragraph per blank-line-separated block."""
    body = strip_gutenberg(list(lines))
    text = "\n".join(" ".join(block) for block in _paragraphs(iter(body)))
    if text:
        stem = path.rsplit("/", 1)[-1]
        yield Document(stem.split(".")[0], path, stem, text)


def _read_hf(f: CorpusFile) -> Iterator[Document]:
    """One Arrow or Parquet file of an HF dataset, streamed by `datasets` a batch at a time (never loaded whole):
    the text column's paragraphs (its lines, stripped; empty ones dropped), ids and titles from their columns."""
    import datasets

    spec = f.spec or CorpusInput(f.path, "hf")
    kind = "parquet" if f.path.endswith(".parquet") else "arrow"
    try:
        ds = datasets.load_dataset(kind, data_files=[f.path], split="train", streaming=True)
        columns = ds.column_names or list(ds.features or {})
    except Exception as err:  # datasets and pyarrow raise many kinds on a file that is not what it claims
        raise CorpusError(f"cannot read {f.path} as an HF dataset ({kind}): {str(err).splitlines()[0]}") from None
    wanted = [c for c in (spec.text_column, spec.id_column, spec.title_column) if c]
    absent = [c for c in wanted if c not in columns]
    if absent:
        raise CorpusError(f"{f.path}: no column {', '.join(map(repr, absent))} (it has {', '.join(columns)}; set "
                          "the input's text_column, id_column, title_column)")
    stem = f.path.rsplit("/", 1)[-1]
    row = 0
    for batch in ds.select_columns(list(dict.fromkeys(wanted))).iter(batch_size=HF_BATCH):
        texts = batch[spec.text_column]
        ids = batch[spec.id_column] if spec.id_column else None
        titles = batch[spec.title_column] if spec.title_column else None
        for i, raw in enumerate(texts):
            text = "\n".join(p for p in (s.strip() for s in str(raw or "").split("\n")) if p)
            if text:
                doc_id = str(ids[i]) if ids is not None else f"{stem}:{row + i}"
                yield Document(doc_id, f.path, str(titles[i] or "") if titles is not None else "", text)
        row += len(texts)


def _read_pydoc() -> Iterator[Document]:
    topics = _pydoc_topics()
    for key in sorted(topics):
        text = "\n".join(" ".join(b) for b in _paragraphs(iter(topics[key].splitlines())))
        if text:
            yield Document(f"pydoc:{key}", PYDOC, key, text)
