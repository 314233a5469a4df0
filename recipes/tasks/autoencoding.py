"""What the autoencoders rebuild: scikit-learn's 8x8 digits, and sentences of any corpus pipeline/corpus.py reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import BertpipeError
from recipes.tasks.text import split_words

if TYPE_CHECKING:
    from recipes.tasks import TaskSpec

DIGITS = "sklearn:digits"  # task.train of the digits task: the 1,797 8x8 digits that ship with scikit-learn
SENTENCE_WORDS = (5, 20)  # the sentences task keeps sentences of this many words (split_words), both included


@dataclass
class ImageExample:
    pixels: torch.Tensor  # (channels, height, width), values in [0, 1]
    label: int  # not trained on by an autoencoder: the linear probe's target


def read_digits(path: Path, spec: TaskSpec) -> list[ImageExample]:
    """scikit-learn's 8x8 handwritten digits (no download), pixels 0..16 scaled to [0, 1]; split by task.holdout."""
    if str(path) != DIGITS:
        raise BertpipeError(f"task {spec.name}: task.train must be {DIGITS} (the digits shipped with scikit-learn), "
                            f"not {str(path)!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return [ImageExample(image, int(label)) for image, label in zip(images, digits.target, strict=True)]


def read_sentences(path: Path, spec: TaskSpec) -> list[str]:
    """The sentences (blingfire, as the shard stage splits them) of a corpus that pipeline/corpus.py reads — a
    WikiExtractor file, a book, plain text or `pydoc` — with SENTENCE_WORDS words, in corpus order."""
    from pipeline.corpus import Corpus, CorpusConfig, CorpusInput
    from pipeline.instances import split_sentences

    low, high = SENTENCE_WORDS
    corpus = Corpus(CorpusConfig([CorpusInput(str(path))]))
    return [s for doc in corpus.documents() for s in split_sentences(doc.text) if low <= len(split_words(s)) <= high]
