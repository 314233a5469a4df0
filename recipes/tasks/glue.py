"""GLUE's sentence tasks as GLUE distributes them, and the pair encoding BERT reads them with.

| task | file | label |
|---|---|---|
| CoLA | no header: source, label (0/1), original annotation, sentence | unacceptable / acceptable |
| MRPC | a byte-order mark, then the header `Quality #1 ID #2 ID #1 String #2 String` | not_equivalent / equivalent |
| RTE | `index sentence1 sentence2 label`, the label a word | entailment / not_entailment |
| WNLI | `index sentence1 sentence2 label`, 0/1 | not_entailment / entailment |
| STS-B | ten columns, `sentence1`, `sentence2` and `score` (0-5) among them | a score (regression) |

Label ids follow GLUE's own label lists (HF `datasets`' glue features), so runs agree with published code on
which class is "positive". A pair is encoded `[CLS] a [SEP] b [SEP]` with token types 0 for `[CLS] a [SEP]` and 1
for `b [SEP]`, truncated longest first to `task.max_len` by the rule of HF tokenizers' `longest_first`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import BertpipeError
from recipes.tasks.files import label_id, read_lines
from recipes.tasks.text import TextExample

if TYPE_CHECKING:
    from recipes.tasks import TaskSpec, TextEncoder

BOM = "\ufeff"
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")  # GLUE's own order; sst2 reads finetune/sst2


@dataclass
class TextPairExample:
    text_a: str
    text_b: str
    label: int | float  # a label id, or STS-B's similarity score


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE file keeps its texts and label: column names under a header, or positions without one."""

    texts: tuple[str, ...] | tuple[int, ...]
    label: str | int
    width: int = 0  # files without a header: the number of fields of every row
    words: bool = False  # labels are written as words (RTE), not as their ids
    score_range: tuple[float, float] | None = None  # regression: a score outside it is an error


LAYOUTS = {
    "cola": GlueLayout((3,), 1, width=4),
    "mrpc": GlueLayout(("#1 String", "#2 String"), "Quality"),
    "rte": GlueLayout(("sentence1", "sentence2"), "label", words=True),
    "wnli": GlueLayout(("sentence1", "sentence2"), "label"),
    "stsb": GlueLayout(("sentence1", "sentence2"), "score", score_range=(0.0, 5.0)),
}


def _label(raw: str, spec: TaskSpec, layout: GlueLayout, where: str) -> int | float:
    if layout.score_range:
        low, high = layout.score_range
        try:
            score = float(raw)
        except ValueError:
            score = float("nan")
        if not low <= score <= high:
            raise BertpipeError(f"{where}: score {raw!r} is not a number in [{low:g}, {high:g}]")
        return score
    if layout.words:
        return label_id(raw, spec.labels, where)
    if not raw.isdigit() or int(raw) >= len(spec.labels):
        raise BertpipeError(f"{where}: label {raw!r} is not one of 0..{len(spec.labels) - 1}")
    return int(raw)


def read_glue(path: Path, spec: TaskSpec) -> list[TextExample | TextPairExample]:
    """A GLUE task's train or dev TSV (LAYOUTS[spec.name]); a row with the wrong number of fields, a header
    without the expected columns or a bad label stops with the file and line."""
    layout = LAYOUTS[spec.name]
    examples: list[TextExample | TextPairExample] = []
    columns: list[int] | None = None
    width = layout.width
    for number, line in read_lines(path):
        fields = line.removeprefix(BOM).split("\t") if number == 1 else line.split("\t")
        where = f"{path}:{number}"
        if not layout.width and columns is None:  # the header names the columns
            names = (*layout.texts, layout.label)
            missing = [n for n in names if n not in fields]
            if missing:
                raise BertpipeError(f"{where}: expected a header with the columns {', '.join(names)}; "
                                    f"{', '.join(missing)} not in {line[:120]!r}")
            columns, width = [fields.index(n) for n in names], len(fields)
            continue
        if len(fields) != width:
            raise BertpipeError(f"{where}: expected {width} tab-separated fields, found {len(fields)}")
        texts = [fields[i].strip() for i in (columns[:-1] if columns else layout.texts)]
        label = _label(fields[columns[-1] if columns else layout.label], spec, layout, where)
        examples.append(TextPairExample(*texts, label) if len(texts) == 2 else TextExample(texts[0], label))
    return examples


def truncate_pair(a: list[int], b: list[int], room: int) -> tuple[list[int], list[int]]:
    """Both sides cut to `room` pieces in all, longest first, as HF tokenizers' `longest_first` cuts: the
    shorter side is kept whole if the longer can make room; otherwise each gets half, the longer the odd one."""
    if len(a) + len(b) <= room:
        return a, b
    n1, n2 = sorted((len(a), len(b)))
    n2 = n1 if n1 > room else max(n1, room - n1)
    if n1 + n2 > room:
        n1, n2 = room // 2, room // 2 + room % 2
    if len(a) > len(b):
        n1, n2 = n2, n1
    return a[:n1], b[:n2]


def encode_pairs(examples: list[TextPairExample], encoder: TextEncoder, max_len: int) -> list[dict]:
    """`[CLS] a [SEP] b [SEP]` (the encoder's prefix and suffix) with token types 0 and 1, at most max_len ids."""
    room = max_len - len(encoder.prefix) - 2 * len(encoder.suffix)
    if room < 2:
        raise BertpipeError(f"task.max_len={max_len} leaves no room for a sentence pair")
    pieces = encoder.pieces([t for ex in examples for t in (ex.text_a, ex.text_b)])
    features = []
    for ex, a, b in zip(examples, pieces[0::2], pieces[1::2], strict=True):
        a, b = truncate_pair(a, b, room)
        first = encoder.prefix + a + encoder.suffix
        second = b + encoder.suffix
        features.append({"input_ids": first + second, "token_type_ids": [0] * len(first) + [1] * len(second),
                         "label": ex.label})
    return features
