"""Tagging, one tag per word: CoNLL-2003 NER (IOB2) and Universal Dependencies POS (CoNLL-U)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import BertpipeError
from recipes.tasks.files import label_id, read_lines

if TYPE_CHECKING:
    from recipes.tasks import TaskSpec

NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
             "SCONJ", "SYM", "VERB", "X")


@dataclass
class TaggedExample:
    words: list[str]
    tags: list[int]


def read_conll(path: Path, spec: TaskSpec) -> list[TaggedExample]:
    """CoNLL-2003: `token POS chunk TAG` a line (the tag is the last column), a blank line between sentences.

    Every token line must have as many columns as the file's first one.
    """
    examples, words, tags, width = [], [], [], None
    for number, line in read_lines(path):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                examples.append(TaggedExample(words, tags))
                words, tags = [], []
            continue
        width = width or len(fields)
        if len(fields) != width or width < 2:
            raise BertpipeError(f"{path}:{number}: expected {max(width, 2)} space-separated columns "
                                f"(token ... tag), found {len(fields)}")
        words.append(fields[0])
        tags.append(label_id(fields[-1], spec.labels, f"{path}:{number}"))
    if words:
        examples.append(TaggedExample(words, tags))
    return examples


def read_conllu(path: Path, spec: TaskSpec) -> list[TaggedExample]:
    """CoNLL-U: 10 tab-separated columns, the UPOS tag in column 4; multiword-token ranges (1-2) and empty
    nodes (8.1) are skipped, so the words are the syntactic words the tags belong to."""
    examples, words, tags = [], [], []
    for number, line in read_lines(path):
        if line.startswith("#"):
            continue
        if not line.strip():
            if words:
                examples.append(TaggedExample(words, tags))
                words, tags = [], []
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise BertpipeError(f"{path}:{number}: expected 10 tab-separated CoNLL-U columns, found {len(fields)}")
        if "-" in fields[0] or "." in fields[0]:
            continue
        if not fields[0].isdigit():
            raise BertpipeError(f"{path}:{number}: token id {fields[0]!r} is not a number")
        words.append(fields[1])
        tags.append(label_id(fields[3], spec.labels, f"{path}:{number}"))
    if words:
        examples.append(TaggedExample(words, tags))
    return examples
