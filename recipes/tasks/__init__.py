"""Downstream tasks: the task registry, text encoders, label alignment, pair encoding and the data module.

Readers live in one module per task family, each checking every line and failing with the file and line
number, so a broken input stops a run before any training starts:

    text.py          single texts to classify: SST-2, sentence polarity, word order
    tagging.py       a tag per word: CoNLL-2003 NER, UD POS
    glue.py          GLUE's TSVs: CoLA, MRPC, RTE, WNLI, STS-B; sentence pairs and their encoding
    translation.py   line-aligned parallel text: Multi30k
    autoencoding.py  what the autoencoders rebuild: digits, corpus sentences
    squad.py         SQuAD v1.1 JSON: questions, contexts, answers (span QA; windows in recipes/squad.py)
    hf_datasets.py   any split held as an HF dataset (save_to_disk, .arrow, .parquet), read by column

Everything is model-agnostic: a model kind supplies a `TextEncoder` (BERT's WordPiece here; a word-level
vocabulary for the RNN baselines) and gets padded batches back. Every name the readers define is importable
from `recipes.tasks`.

Batches: `input_ids`, `attention_mask`, `token_type_ids` (B, S; token types 1 on a pair's second segment),
and per task kind either `labels` (B,): label ids ("classify") or scores ("regress"); or `word_starts` and
`tags` (B, W) ("tag"): the position of each word's first piece (-1 when the word was cut off by `max_len`)
and the word's tag (-100 on padding). Only first pieces carry a label; the other pieces of a word are
ignored, as in BERT's NER setup.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader

from pipeline.errors import BertpipeError
from pipeline.hf_interop import TOKENIZER_FILES
from pipeline.workers import SignalSafeLoader
from recipes.tasks.autoencoding import DIGITS, SENTENCE_WORDS, ImageExample, read_digits, read_sentences
from recipes.tasks.files import label_id, read_lines
from recipes.tasks.glue import GLUE_TASKS, TextPairExample, encode_pairs, read_glue, truncate_pair
from recipes.tasks.hf_datasets import dataset_files, is_dataset, read_dataset
from recipes.tasks.squad import SquadExample, read_squad
from recipes.tasks.tagging import NER_TAGS, UPOS_TAGS, TaggedExample, read_conll, read_conllu
from recipes.tasks.text import TextExample, read_labelled_tsv, read_polarity, read_word_order, split_words
from recipes.tasks.translation import PairExample, read_pairs

__all__ = [
    "Collator", "DIGITS", "GLUE_TASKS", "ImageExample", "NER_TAGS", "PairExample", "SENTENCE_WORDS", "SPLITS",
    "SquadExample", "TASKS", "TaggedExample", "TaskConfig", "TaskDataModule", "TaskSpec", "TextEncoder", "TextExample",
    "TextPairExample", "UPOS_TAGS", "WordPieceEncoder", "align_words", "encode", "encode_pairs", "encode_text",
    "get_task", "input_files", "is_dataset", "label_id", "read_conll", "read_conllu", "read_dataset", "read_digits",
    "read_glue", "read_labelled_tsv", "read_lines", "read_pairs", "read_polarity", "read_sentences", "read_splits",
    "read_squad", "read_word_order", "split_words", "truncate_pair",
]
SPLITS = ("train", "dev", "test")


@dataclass
class TaskConfig:
    name: str = "sst2"  # a key of TASKS: sst2 | rt_polarity | conll2003 | ud_pos | word_order | multi30k | digits
    # | sentences | cola | mrpc | stsb | rte | wnli | squad
    data_dir: str = "${oc.env:DATA_DIR,../shared/data}"
    train: str = ""  # file (or, for rt_polarity, the path without .pos/.neg) of each split; "" or null = none
    dev: str | None = ""
    test: str | None = ""
    holdout: float = 0.0  # > 0: carve dev and test, each this share, out of `train` (rt_polarity has no split)
    split_seed: int = 1234  # the holdout split and the max_train sample: fixed, so every model sees the same data
    max_len: int = 128  # pieces per example, specials included; longer examples are cut
    max_train: int | None = None  # a seeded sample of this many training examples (quick runs)
    max_eval: int | None = None  # the first N dev/test examples
    # a split may also be an HF dataset (a save_to_disk directory, an .arrow or .parquet file), read by column:
    text_column: str = "text"  # classification: the text
    label_column: str = "label"  # classification: the label (its index, or its name; ClassLabel names are matched)
    words_column: str = "tokens"  # tagging: the words of a sentence (a list of strings)
    tags_column: str = "tags"  # tagging: their tags (indices or names, as the label column)
    # span tasks (squad; recipes/squad.py): windows over long contexts and the decoding of answers
    doc_stride: int = 128  # context pieces two consecutive windows share
    max_query_len: int = 64  # question pieces kept
    max_answer_len: int = 30  # pieces of the longest answer decoded
    n_best: int = 20  # (start, end) candidates kept per window and per question

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task.name must be one of {', '.join(TASKS)}")
        if not 0.0 <= self.holdout < 0.5:
            raise ValueError("task.holdout must be in [0, 0.5)")
        if self.max_len < 4:
            raise ValueError("task.max_len must be at least 4")


# ---- the task registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, its label set (fixed, so label ids agree across runs) and how to read it."""

    name: str
    kind: str  # "classify": one label per text (or pair); "regress": one score per text (or pair); "tag": one tag
    # per word; "translate": a text per text; "image" or "sentences": inputs an autoencoder rebuilds; "span": an
    # answer's start and end in a context (labels: the two logits of each position)
    labels: tuple[str, ...]  # empty for "regress" (one output: the score)
    reader: Callable[[Path, TaskSpec], list]
    main_metric: str  # on the dev split: picks the best checkpoint and heads the leaderboard
    suffixes: tuple[str, ...] = ("",)  # the files a configured path stands for
    scheme: str | None = None  # "iob2": entity-level precision/recall/F1 (seqeval)
    default_tag: str | None = None  # the tag of words cut off by max_len (they still count in the metrics)
    higher_is_better: bool = True  # of main_metric (False for a reconstruction error)
    together: bool = False  # the reader gets the bare path and reads all its suffixed files at once (pairs)
    pair: bool = False  # examples are sentence pairs (TextPairExample): `[CLS] a [SEP] b [SEP]` for BERT
    metrics: tuple[str, ...] = ()  # metrics beyond the kind's own (recipes/metrics.py EXTRA), e.g. "mcc"
    mean_of: tuple[str, ...] = ()  # main_metric is the mean of these metrics (GLUE's MRPC and STS-B)

    @property
    def num_outputs(self) -> int:
        """The network's outputs per example: one per label, or the score alone."""
        return 1 if self.kind == "regress" else len(self.labels)

    def read(self, path: str | Path) -> list:
        if self.together:
            return self.reader(Path(path), self)
        return [ex for suffix in self.suffixes for ex in self.reader(Path(f"{path}{suffix}"), self)]

    def files(self, path: str | Path) -> list[Path]:
        path = str(path).partition("#")[0]  # a reader's selection within the file (squad: `#articles=0-37`)
        return [Path(f"{path}{suffix}") for suffix in self.suffixes]


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "classify", ("negative", "positive"), read_labelled_tsv, "accuracy"),
    "rt_polarity": TaskSpec("rt_polarity", "classify", ("negative", "positive"), read_polarity, "accuracy",
                            suffixes=(".neg", ".pos")),
    "conll2003": TaskSpec("conll2003", "tag", NER_TAGS, read_conll, "f1", scheme="iob2", default_tag="O"),
    "ud_pos": TaskSpec("ud_pos", "tag", UPOS_TAGS, read_conllu, "accuracy", default_tag="X"),
    "multi30k": TaskSpec("multi30k", "translate", (), read_pairs, "bleu", suffixes=(".en.gz", ".de.gz"),
                         together=True),  # English -> German image captions; BLEU of detokenized output
    # autoencoders (model.kind autoencoder): reconstruction error of images (lower is better), token accuracy of
    # sentences rebuilt from their code (teacher-forced); the digit labels only feed the linear probe
    "digits": TaskSpec("digits", "image", tuple("0123456789"), read_digits, "mse", higher_is_better=False),
    "sentences": TaskSpec("sentences", "sentences", (), read_sentences, "token_accuracy"),
    "word_order": TaskSpec("word_order", "classify", ("shuffled", "real"), read_word_order, "accuracy"),
    # GLUE (recipes/tasks/glue.py), each task's main metric as GLUE reports it; sst2 above is GLUE's SST-2
    "cola": TaskSpec("cola", "classify", ("unacceptable", "acceptable"), read_glue, "mcc", metrics=("mcc",)),
    "mrpc": TaskSpec("mrpc", "classify", ("not_equivalent", "equivalent"), read_glue, "accuracy_f1", pair=True,
                     mean_of=("accuracy", "f1")),
    "stsb": TaskSpec("stsb", "regress", (), read_glue, "pearson_spearman", pair=True, mean_of=("pearson", "spearman")),
    "rte": TaskSpec("rte", "classify", ("entailment", "not_entailment"), read_glue, "accuracy", pair=True),
    "wnli": TaskSpec("wnli", "classify", ("not_entailment", "entailment"), read_glue, "accuracy", pair=True),
    "squad": TaskSpec("squad", "span", ("start", "end"), read_squad, "f1"),  # SQuAD v1.1: EM/F1 of answer spans
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise BertpipeError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]


def read_splits(cfg: TaskConfig, spec: TaskSpec) -> dict[str, list]:
    """The examples of every configured split, with the holdout split and the max_train/max_eval limits."""
    if not cfg.train:
        raise BertpipeError(f"task {spec.name}: task.train is not set")
    if cfg.holdout > 0 and (cfg.dev or cfg.test):
        raise BertpipeError("task.holdout carves dev and test out of train: leave task.dev and task.test empty")
    splits = {name: read_split(cfg, spec, getattr(cfg, name)) for name in SPLITS if getattr(cfg, name)}
    rng = random.Random(cfg.split_seed)
    if cfg.holdout > 0:
        order = list(range(len(splits["train"])))
        rng.shuffle(order)
        n = int(len(order) * cfg.holdout)
        pick = [splits["train"][i] for i in order]
        splits = {"train": pick[2 * n:], "dev": pick[:n], "test": pick[n:2 * n]}
    if "dev" not in splits:
        raise BertpipeError(f"task {spec.name}: no dev split (set task.dev or task.holdout)")
    if cfg.max_train is not None and cfg.max_train < len(splits["train"]):
        splits["train"] = rng.sample(splits["train"], cfg.max_train)
    if cfg.max_eval is not None:
        splits.update({k: v[:cfg.max_eval] for k, v in splits.items() if k != "train"})
    for name, examples in splits.items():
        if not examples:
            raise BertpipeError(f"task {spec.name}: the {name} split is empty")
    return splits


def read_split(cfg: TaskConfig, spec: TaskSpec, path: str) -> list:
    """A split's examples from its task's own files, or from an HF dataset by the configured columns."""
    return read_dataset(Path(path), spec, cfg) if is_dataset(path) else spec.read(path)


def input_files(cfg: TaskConfig, spec: TaskSpec) -> dict[str, list[Path]]:
    return {name: dataset_files(path) if is_dataset(path) else spec.files(path)
            for name in SPLITS if (path := getattr(cfg, name))}


# ---- text encoders ---------------------------------------------------------------------------------------


class TextEncoder(Protocol):
    """What the data side needs from a model's vocabulary: ids per text, and the ids around a sequence."""

    pad_id: int
    unk_id: int
    vocab_size: int
    prefix: list[int]  # [CLS] for BERT; [] for a word-level RNN
    suffix: list[int]  # [SEP] for BERT

    def pieces(self, texts: list[str]) -> list[list[int]]: ...

    def save(self, directory: Path) -> None: ...


class WordPieceEncoder:
    """A WordPiece tokenizer of any BERT vocabulary layout (`tokenization.load_tokenizer`: tokenizer.json, or
    vocab.txt alone); `special` tells where its specials and unused slots sit."""

    def __init__(self, directory: str | Path):
        from pipeline.vocab import verify_vocab
        from tokenization import load_tokenizer, special_ids

        directory = Path(directory)
        verify_vocab(directory)  # a vocab stage's directory: its files against its manifest
        try:
            self.tokenizer = load_tokenizer(directory)
            self.special = special_ids(self.tokenizer)
        except FileNotFoundError:
            raise BertpipeError(f"{directory}: no tokenizer.json or vocab.txt (set model.vocab_dir)") from None
        except ValueError as err:
            raise BertpipeError(f"{directory}: {err}") from None
        ids = self.special
        self.directory = directory
        self.pad_id, self.unk_id, self.vocab_size = ids.pad, ids.unk, ids.vocab_size
        self.prefix, self.suffix = [ids.cls], [ids.sep]

    def pieces(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / "tokenizer.json"))
        for name in TOKENIZER_FILES:
            if name != "tokenizer.json" and (self.directory / name).is_file():
                shutil.copy2(self.directory / name, directory / name)


# ---- encoding and label alignment ------------------------------------------------------------------------


def encode_text(encoder: TextEncoder, pieces: list[int], max_len: int) -> list[int]:
    keep = max_len - len(encoder.prefix) - len(encoder.suffix)
    return encoder.prefix + pieces[:keep] + encoder.suffix


def align_words(encoder: TextEncoder, word_pieces: list[list[int]], max_len: int) -> tuple[list[int], list[int]]:
    """The ids of a sentence given each word's pieces, and the position of each word's first piece.

    A word that yields no piece (a lone control or zero-width character) becomes [UNK], so every word keeps a
    position; words that no longer fit in `max_len` get -1 and are never trained on.
    """
    ids, starts = list(encoder.prefix), []
    room = max_len - len(encoder.suffix)
    for pieces in word_pieces:
        pieces = pieces or [encoder.unk_id]
        if (starts and starts[-1] < 0) or len(ids) + len(pieces) > room:  # once one word is cut, so are the rest
            starts.append(-1)
            continue
        starts.append(len(ids))
        ids.extend(pieces)
    return ids + encoder.suffix, starts


def encode(examples: list, encoder: TextEncoder, max_len: int) -> list[dict]:
    """Features for the collator: input_ids plus `label` (texts), `token_type_ids` and `label` (sentence pairs)
    or `word_starts` and `tags` (tagged words)."""
    if not examples:
        return []
    if isinstance(examples[0], TextPairExample):
        return encode_pairs(examples, encoder, max_len)
    if isinstance(examples[0], TextExample):
        pieces = encoder.pieces([ex.text for ex in examples])
        return [{"input_ids": encode_text(encoder, p, max_len), "label": ex.label}
                for ex, p in zip(examples, pieces, strict=True)]
    vocab = sorted({w for ex in examples for w in ex.words})  # each distinct word is encoded once
    lookup = dict(zip(vocab, encoder.pieces(vocab), strict=True))
    features = []
    for ex in examples:
        ids, starts = align_words(encoder, [lookup[w] for w in ex.words], max_len)
        features.append({"input_ids": ids, "word_starts": starts, "tags": ex.tags})
    return features


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class Collator:
    """Pads a list of features to the longest in the batch."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = _pad([f["input_ids"] for f in features], self.pad_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        types = _pad([f["token_type_ids"] for f in features], 0) if "token_type_ids" in features[0] else None
        batch = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids) if types is None else types,
                 "attention_mask": (torch.arange(input_ids.size(1))[None, :] < lengths[:, None]).long()}
        if features and "label" in features[0]:  # label ids (long) or scores (float)
            batch["labels"] = torch.tensor([f["label"] for f in features])
        else:
            batch["word_starts"] = _pad([f["word_starts"] for f in features], -1)
            batch["tags"] = _pad([f["tags"] for f in features], -100)
        return batch


class TaskDataModule(L.LightningDataModule):
    """Batches of a task's splits for a model's encoder: shuffled for training, in file order for evaluation."""

    def __init__(self, splits: dict[str, list], encoder: TextEncoder, max_len: int, batch_size: int = 32,
                 num_workers: int = 0):
        super().__init__()
        self.splits, self.encoder, self.max_len = splits, encoder, max_len
        self.batch_size, self.num_workers = batch_size, num_workers
        self.features: dict[str, list[dict]] = {}

    def encode(self, examples: list) -> list[dict]:
        """One split's features; a model kind with other examples (pairs, images) overrides this and collate."""
        return encode(examples, self.encoder, self.max_len)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return Collator(self.encoder.pad_id)(features)

    def setup(self, stage: str | None = None) -> None:
        for name, examples in self.splits.items():
            if name not in self.features:
                self.features[name] = self.encode(examples)

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return SignalSafeLoader(self.features[split], batch_size=self.batch_size, shuffle=shuffle,
                                collate_fn=self.collate, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("dev")
