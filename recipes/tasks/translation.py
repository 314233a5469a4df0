"""Translation: line-aligned parallel text (Multi30k), a source sentence and its translation per example."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import BertpipeError
from recipes.tasks.files import read_lines

if TYPE_CHECKING:
    from recipes.tasks import TaskSpec


@dataclass
class PairExample:
    source: str
    target: str


def read_pairs(path: Path, spec: TaskSpec) -> list[PairExample]:
    """Line-aligned parallel text: `<path><suffix>` per side (`train.en.gz`, `train.de.gz`), the source side
    first, line n of one the translation of line n of the other; both must have the same number of lines and no
    empty line, else the error names the file and line where the alignment breaks."""
    files = spec.files(path)
    sides = [[(f, number, line.strip()) for number, line in read_lines(f)] for f in files]
    for side in sides:
        for f, number, line in side:
            if not line:
                raise BertpipeError(f"{f}:{number}: empty line (every sentence needs its translation)")
    counts = [len(side) for side in sides]
    short, long = counts.index(min(counts)), counts.index(max(counts))
    if counts[short] != counts[long]:
        raise BertpipeError(f"{files[long]}:{len(sides[short]) + 1}: no aligned line in {files[short]} "
                            f"(it has {len(sides[short])} lines, this file {len(sides[long])})")
    return [PairExample(src[2], tgt[2]) for src, tgt in zip(sides[0], sides[1], strict=True)]
