"""The vocab stage: stream a corpus into HF `tokenizers`' WordPiece trainer and write a vocab directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import atomic_dir, library_versions, read_manifest, sha256_file, sha256_json, write_json
from pipeline.config import to_dict
from pipeline.corpus import Corpus, CorpusConfig
from pipeline.errors import BertpipeError
from pipeline.log import progress
from tokenization import save_tokenizer, special_ids, train_wordpiece

log = logging.getLogger(__name__)


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
        if self.min_frequency < 1 or self.limit_alphabet < 1 or self.batch_size < 1 or self.num_unused < 0:
            raise ValueError("min_frequency, limit_alphabet and batch_size must be positive, num_unused >= 0")

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
    """Build the vocabulary into `cfg.output_dir`; a rerun with unchanged inputs and settings does nothing."""
    out = Path(cfg.output_dir)
    corpus = Corpus(cfg.corpus)
    inputs = corpus.fingerprint()
    key = sha256_json({"inputs": inputs, "settings": cfg.settings()})
    previous = read_manifest(out)
    if previous and previous.get("key") == key and not force:
        log.info("vocabulary in %s is up to date (inputs and settings unchanged); --force rebuilds", out)
        return out

    start = time.perf_counter()
    counts: dict[str, int] = {}
    passes = iter(("vocab: count characters", "vocab: train"))
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
    with atomic_dir(out) as tmp:
        save_tokenizer(tok, tmp, lowercase=cfg.lowercase, strip_accents=cfg.strip_accents)
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
            "duration_s": round(time.perf_counter() - start, 3),
            "versions": library_versions("tokenizers"),
        })
    log.info("wrote %s: %d entries from %d documents in %.1f s", out, ids.vocab_size, corpus.documents_read,
             time.perf_counter() - start)
    return out


def vocab_hash(vocab_dir: str | Path) -> str:
    """The sha256 of a vocab directory's vocab.txt: how later stages name the vocabulary they used."""
    path = Path(vocab_dir) / "vocab.txt"
    if not path.is_file():
        raise BertpipeError(f"no vocab.txt in {vocab_dir} (run `bertpipe vocab` first)")
    return sha256_file(path)
