"""Splits held as HF datasets (a `Dataset.save_to_disk` directory, an .arrow or a .parquet file): classification
texts and labels, or tagged words, read by the columns `task.*_column` name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import BertpipeError
from recipes.tasks.files import label_id
from recipes.tasks.tagging import TaggedExample
from recipes.tasks.text import TextExample

if TYPE_CHECKING:
    from recipes.tasks import TaskConfig, TaskSpec


def is_dataset(path: str | Path) -> bool:
    """An HF dataset: a directory written by `Dataset.save_to_disk` or a single .arrow / .parquet file."""
    path = Path(path)
    return path.suffix in (".arrow", ".parquet") or (path / "state.json").is_file()


def dataset_files(path: str | Path) -> list[Path]:
    path = Path(path)
    return sorted(path.glob("*.arrow")) if path.is_dir() else [path]


def _label_names(feature) -> list[str] | None:
    return list(feature.names) if hasattr(feature, "names") else None


def read_dataset(path: Path, spec: TaskSpec, cfg: TaskConfig) -> list:
    """Texts and labels (task.text_column, task.label_column) or words and tags (task.words_column,
    task.tags_column) of an HF dataset; ClassLabel values are matched to the task's labels by name."""
    import datasets

    if spec.kind not in ("classify", "tag") or spec.pair:
        raise BertpipeError(f"{path}: task {spec.name} reads its own files, not an HF dataset")
    if not path.exists():
        raise BertpipeError(f"{path}: file not found (set task.data_dir or DATA_DIR)")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))  # memory-mapped
        else:
            kind = "parquet" if path.suffix == ".parquet" else "arrow"
            ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True)
        features = ds.features
    except Exception as err:  # datasets and pyarrow raise many kinds on a file that is not a dataset
        raise BertpipeError(f"{path}: not a readable HF dataset: {str(err).splitlines()[0]}") from None
    classify = spec.kind == "classify"
    first, second = (cfg.text_column, cfg.label_column) if classify else (cfg.words_column, cfg.tags_column)
    absent = [c for c in (first, second) if c not in features]
    if absent:
        keys = "task.text_column / task.label_column" if classify else "task.words_column / task.tags_column"
        raise BertpipeError(f"{path}: no column {', '.join(map(repr, absent))} (it has {', '.join(features)}; "
                            f"set {keys})")
    feature = features[second]
    names = _label_names(feature if spec.kind == "classify" else getattr(feature, "feature", feature))

    def label(value, where: str) -> int:
        if isinstance(value, str) or names is not None:
            return label_id(names[value] if names is not None and isinstance(value, int) else str(value),
                          spec.labels, where)
        if not isinstance(value, int) or not 0 <= value < len(spec.labels):
            raise BertpipeError(f"{where}: label {value!r} is not one of 0..{len(spec.labels) - 1}")
        return value

    examples = []
    for row, record in enumerate(ds.select_columns([first, second])):
        where = f"{path}: row {row}"
        if spec.kind == "classify":
            examples.append(TextExample(str(record[first]).strip(), label(record[second], where)))
            continue
        words, tags = record[first], record[second]
        if len(words) != len(tags):
            raise BertpipeError(f"{where}: {len(words)} words but {len(tags)} tags")
        examples.append(TaggedExample([str(w) for w in words], [label(t, where) for t in tags]))
    return examples
