"""The vocab stage: stream a corpus into HF `tokenizers`' WordPiece trainer and write a vocab directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.artifacts import (
    atomic_dir,
    claim_output,
    library_versions,
    read_manifest,
    sha256_file,
    sha256_json,
    write_json,
)
from pipeline.config import to_dict
from pipeline.corpus import Corpus, CorpusConfig
from pipeline.errors import BertpipeError
from pipeline.log import progress
from tokenization import load_tokenizer, save_tokenizer, special_ids, train_wordpiece

log = logging.getLogger(__name__)

VOCAB_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class VocabConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output_dir: str = "build/vocab"
    vocab_size: int = 30_000  # entries in all: specials, [unusedN] slots and learned pieces
    lowercase: bool = True  # uncased BERT; false keeps case (a cased vocabulary)
    strip_accents: bool | None = None  # None follows lowercase, as BERT does
    min_frequency: int = 2  # a merge must be seen this often
    limit_alphabet: int = 1000  # at most this many distinct characters kept as initial pieces
    num_unused: int = 0  # [unused0..N-1] slots after the specials, for tokens added later
    batch_size: int = 1000  # documents per batch handed to the trainer

    def __post_init__(self) -> None:
        if self.vocab_size < 5 + self.num_unused + 1:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for learned pieces")
        for key, low in (("min_frequency", 1), ("limit_alphabet", 1), ("batch_size", 1), ("num_unused", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be at least {low}, not {getattr(self, key)}")

    def settings(self) -> dict:
        """What determines the vocabulary, beside the corpus bytes (output_dir and batch_size do not)."""
        keys = ("vocab_size", "lowercase", "strip_accents", "min_frequency", "limit_alphabet", "num_unused")
        return {k: getattr(self, k) for k in keys} | {"encoding_errors": self.corpus.encoding_errors}


def _batches(corpus: Corpus, size: int, counts: dict, desc: str) -> Iterator[list[str]]:
    batch: list[str] = []
    counts["characters"] = 0
    bar = progress(unit="doc", desc=desc)
    for doc in corpus.documents():
        batch.append(doc.text)
        counts["characters"] += len(doc.text)
        bar.update()
        if len(batch) == size:
            yield batch
            batch = []
    bar.close()
    if batch:
        yield batch


def build_vocab(cfg: VocabConfig, force: bool = False) -> Path:
    """Build the vocabulary into `cfg.output_dir`; a rerun with unchanged inputs and settings does nothing.

    `output_dir` may only be absent, empty or an earlier vocabulary (anything else stops the stage)."""
    out = Path(cfg.output_dir)
    state = claim_output(out, "vocab")
    corpus = Corpus(cfg.corpus)
    inputs = corpus.fingerprint()
    key = sha256_json({"inputs": inputs, "settings": cfg.settings()})
    previous = read_manifest(out) if state == "ours" else None
    if previous and previous.get("key") == key and not force:
        log.info("vocabulary in %s is up to date (inputs and settings unchanged); --force rebuilds", out)
        return out

    start = time.perf_counter()
    counts: dict[str, int] = {}
    passes = iter(("vocab: count characters", "vocab: train"))
    with atomic_dir(out, "vocab") as tmp:  # made first: an unwritable output stops the stage before training
        log.info("training a %d-entry WordPiece vocabulary on %d file(s), %.1f MB",
                 cfg.vocab_size, len(inputs), sum(i["size"] for i in inputs) / 1e6)
        tok = train_wordpiece(
            lambda: _batches(corpus, cfg.batch_size, counts, next(passes)), cfg.vocab_size, lowercase=cfg.lowercase,
            strip_accents=cfg.strip_accents, min_frequency=cfg.min_frequency, limit_alphabet=cfg.limit_alphabet,
            num_unused=cfg.num_unused,
        )
        ids = special_ids(tok)
        if ids.vocab_size < cfg.vocab_size:
            log.warning("the corpus yields only %d entries of the %d asked for", ids.vocab_size, cfg.vocab_size)
        try:
            save_tokenizer(tok, tmp, lowercase=cfg.lowercase, strip_accents=cfg.strip_accents)
        except OSError:
            raise
        except Exception as err:  # tokenizers reports a failed write as a plain Exception ("... (os error 28)")
            raise BertpipeError(f"cannot write {tmp / 'tokenizer.json'}: {err}") from None
        write_json(tmp / "manifest.json", {
            "stage": "vocab",
            "key": key,
            "inputs": inputs,
            "settings": cfg.settings(),
            "config": to_dict(cfg),
            "counts": {
                "files": len(inputs), "documents": corpus.documents_read, "bytes": sum(i["size"] for i in inputs),
                "characters": counts["characters"], "replaced_chars": corpus.replaced_chars,
                "vocab_size": ids.vocab_size,
            },
            "vocab_sha256": sha256_file(tmp / "vocab.txt"),
            "files": {name: sha256_file(tmp / name) for name in VOCAB_FILES},
            "duration_s": round(time.perf_counter() - start, 3),
            "versions": library_versions("tokenizers"),
        })
    log.info("wrote %s: %d entries from %d documents in %.1f s", out, ids.vocab_size, corpus.documents_read,
             time.perf_counter() - start)
    return out


def vocab_hash(vocab_dir: str | Path) -> str:
    """The sha256 of a vocab directory's vocab.txt: how later stages name the vocabulary they used.

    A directory the vocab stage wrote is first checked against its manifest (`verify_vocab`)."""
    path = Path(vocab_dir) / "vocab.txt"
    if not path.is_file():
        raise BertpipeError(f"no vocab.txt in {vocab_dir} (run `bertpipe vocab` first)")
    return verify_vocab(vocab_dir) or sha256_file(path)


def verify_vocab(vocab_dir: str | Path) -> str | None:
    """Check a vocab directory's files against the sha256s its manifest lists; returns vocab.txt's sha256,
    or None for a directory without a vocab manifest (an HF or Google vocabulary: nothing to check against)."""
    vocab_dir = Path(vocab_dir)
    manifest = read_manifest(vocab_dir)
    if not manifest or manifest.get("stage") != "vocab":
        return None
    listed = manifest.get("files") or {"vocab.txt": manifest["vocab_sha256"]}  # older manifests: vocab.txt only
    for name, sha in listed.items():
        path = vocab_dir / name
        if not path.is_file():
            raise BertpipeError(f"{path} is missing (the vocabulary's manifest lists it); rebuild it with "
                                "`bertpipe vocab --force`")
        if sha256_file(path) != sha:
            raise BertpipeError(f"{path} does not match the sha256 in its manifest (truncated or edited?); "
                                "rebuild it with `bertpipe vocab --force`")
    return manifest["vocab_sha256"]


def load_vocab(vocab_dir: str | Path) -> Tokenizer:
    """The tokenizer of a vocab directory, its files checked first (`verify_vocab`); bad files are one line."""
    if not Path(vocab_dir).is_dir():
        raise BertpipeError(f"vocab directory not found: {vocab_dir} (run `bertpipe vocab` first)")
    verify_vocab(vocab_dir)
    try:
        return load_tokenizer(vocab_dir)
    except FileNotFoundError as err:
        raise BertpipeError(str(err)) from None
    except Exception as err:  # tokenizers raises a plain Exception on a damaged tokenizer.json
        raise BertpipeError(f"{Path(vocab_dir) / 'tokenizer.json'}: cannot load: {str(err).splitlines()[0]}") from None
