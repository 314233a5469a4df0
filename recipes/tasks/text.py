"""Single-text classification: SST-2's labelled TSV, sentence polarity's two files, and the word-order task
built offline from any corpus."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import BertpipeError
from recipes.tasks.files import label_id, read_lines

if TYPE_CHECKING:
    from recipes.tasks import TaskSpec


@dataclass
class TextExample:
    text: str
    label: int


_WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Words of free text for tagging, close to CoNLL's tokens: punctuation apart, `co-writer`, `U.S` kept."""
    return _WORD.findall(text)


def read_labelled_tsv(path: Path, spec: TaskSpec) -> list[TextExample]:
    """A header naming a `label` column and one text column, then `label<TAB>text` rows; labels are indices."""
    examples, label_col = [], None
    for number, line in read_lines(path):
        fields = line.split("\t")
        if label_col is None:
            if len(fields) != 2 or "label" not in fields:
                raise BertpipeError(f"{path}:{number}: expected a header of two tab-separated columns, one of them "
                                    f"'label', found {line[:80]!r}")
            label_col = fields.index("label")
            continue
        if len(fields) != 2:
            raise BertpipeError(f"{path}:{number}: expected 2 tab-separated fields (label and text), "
                                f"found {len(fields)}")
        raw, text = fields[label_col], fields[1 - label_col]
        if not raw.isdigit() or int(raw) >= len(spec.labels):
            raise BertpipeError(f"{path}:{number}: label {raw!r} is not one of 0..{len(spec.labels) - 1}")
        examples.append(TextExample(text.strip(), int(raw)))
    return examples


def read_polarity(path: Path, spec: TaskSpec) -> list[TextExample]:
    """Sentence polarity v1.0: one sentence a line; the label is the file's suffix (.neg or .pos)."""
    label = label_id({".neg": "negative", ".pos": "positive"}.get(path.suffix, path.suffix), spec.labels, str(path))
    return [TextExample(line.strip(), label) for _, line in read_lines(path) if line.strip()]


def read_word_order(path: Path, spec: TaskSpec) -> list[TextExample]:
    """A labeled task built offline from any corpus (the demo's, when no data directory is there): each
    sentence of `read_sentences`, as it was ("real") or with its words shuffled ("shuffled"), half and half by a
    fixed seed. Both are written as words joined by single spaces, so only the order tells them apart: a
    bag-of-words model stays at chance, an RNN or BERT must read the sequence."""
    from recipes.tasks.autoencoding import read_sentences

    rng = random.Random(1234)
    examples = []
    for sentence in read_sentences(path, spec):
        words = split_words(sentence)
        label = rng.randrange(2)
        if label == 0:
            shuffled = words[:]
            while shuffled == words and len(set(words)) > 1:
                rng.shuffle(shuffled)
            if shuffled == words:  # a sentence of one repeated word has no other order
                continue
            words = shuffled
        examples.append(TextExample(" ".join(words), label))
    return examples
