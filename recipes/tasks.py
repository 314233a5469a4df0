"""Downstream tasks: file readers, the task registry, text encoders, label alignment and the data module.

Everything here is model-agnostic: a model kind supplies a `TextEncoder` (BERT's WordPiece here; a word-level
vocabulary for the RNN baselines) and gets padded batches back. Readers check every line and fail with the
file and line number, so a broken input stops a run before any training starts.

Batches: `input_ids`, `attention_mask`, `token_type_ids` (B, S), and per task kind either `labels` (B,)
("classify") or `word_starts` and `tags` (B, W) ("tag"): the position of each word's first piece (-1 when the
word was cut off by `max_len`) and the word's tag (-100 on padding). Only first pieces carry a label; the
other pieces of a word are ignored, as in BERT's NER setup.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from torch.utils.data import DataLoader

from pipeline.errors import BertpipeError
from pipeline.hf_interop import TOKENIZER_FILES

NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
             "SCONJ", "SYM", "VERB", "X")
SPLITS = ("train", "dev", "test")


@dataclass
class TaskConfig:
    name: str = "sst2"  # sst2 | rt_polarity | conll2003 | ud_pos | word_order | multi30k | digits | sentences | squad
    data_dir: str = "${oc.env:DATA_DIR,../shared/data}"
    train: str = ""  # file (or, for rt_polarity, the path without .pos/.neg) of each split; "" or null = none
    dev: str | None = ""
    test: str | None = ""
    holdout: float = 0.0  # > 0: carve dev and test, each this share, out of `train` (rt_polarity has no split)
    split_seed: int = 1234  # the holdout split and the max_train sample: fixed, so every model sees the same data
    max_len: int = 128  # pieces per example, specials included; longer examples are cut
    max_train: int | None = None  # a seeded sample of this many training examples (quick runs)
    max_eval: int | None = None  # the first N dev/test examples
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


# ---- examples and readers -------------------------------------------------------------------------------


@dataclass
class TextExample:
    text: str
    label: int


@dataclass
class TaggedExample:
    words: list[str]
    tags: list[int]


@dataclass
class PairExample:
    source: str
    target: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline), gunzipped for `.gz`; a missing file, a broken gzip stream or
    invalid UTF-8 names the file and line."""
    if not path.is_file():
        raise BertpipeError(f"{path}: file not found (set task.data_dir or DATA_DIR)")
    number = 0
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
        try:
            for number, raw in enumerate(fh, 1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise BertpipeError(f"{path}:{number}: invalid UTF-8 at byte {err.start}") from None
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise BertpipeError(f"{path}:{number + 1}: cannot read: {err}") from None


def _index(value: str, labels: tuple[str, ...], where: str) -> int:
    try:
        return labels.index(value)
    except ValueError:
        raise BertpipeError(f"{where}: unknown label {value!r} (expected one of {', '.join(labels)})") from None


def read_labelled_tsv(path: Path, spec: TaskSpec) -> list[TextExample]:
    """A header naming a `label` column and one text column, then `label<TAB>text` rows; labels are indices."""
    examples, label_col = [], None
    for number, line in _lines(path):
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
    label = _index({".neg": "negative", ".pos": "positive"}.get(path.suffix, path.suffix), spec.labels, str(path))
    return [TextExample(line.strip(), label) for _, line in _lines(path) if line.strip()]


def read_conll(path: Path, spec: TaskSpec) -> list[TaggedExample]:
    """CoNLL-2003: `token POS chunk TAG` a line (the tag is the last column), a blank line between sentences.

    Every token line must have as many columns as the file's first one.
    """
    examples, words, tags, width = [], [], [], None
    for number, line in _lines(path):
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
        tags.append(_index(fields[-1], spec.labels, f"{path}:{number}"))
    if words:
        examples.append(TaggedExample(words, tags))
    return examples


def read_conllu(path: Path, spec: TaskSpec) -> list[TaggedExample]:
    """CoNLL-U: 10 tab-separated columns, the UPOS tag in column 4; multiword-token ranges (1-2) and empty
    nodes (8.1) are skipped, so the words are the syntactic words the tags belong to."""
    examples, words, tags = [], [], []
    for number, line in _lines(path):
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
        tags.append(_index(fields[3], spec.labels, f"{path}:{number}"))
    if words:
        examples.append(TaggedExample(words, tags))
    return examples


def read_pairs(path: Path, spec: TaskSpec) -> list[PairExample]:
    """Line-aligned parallel text: `<path><suffix>` per side (`train.en.gz`, `train.de.gz`), the source side
    first, line n of one the translation of line n of the other; both must have the same number of lines and no
    empty line, else the error names the file and line where the alignment breaks."""
    files = spec.files(path)
    sides = [[(f, number, line.strip()) for number, line in _lines(f)] for f in files]
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


@dataclass
class ImageExample:
    pixels: torch.Tensor  # (channels, height, width), values in [0, 1]
    label: int  # not trained on by an autoencoder: the linear probe's target


DIGITS = "sklearn:digits"  # task.train of the digits task: the 1,797 8x8 digits that ship with scikit-learn
SENTENCE_WORDS = (5, 20)  # the sentences task keeps sentences of this many words (split_words), both included


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


def read_word_order(path: Path, spec: TaskSpec) -> list[TextExample]:
    """A labeled task built offline from any corpus (the demo's, when no data directory is there): each
    sentence of `read_sentences`, as it was ("real") or with its words shuffled ("shuffled"), half and half by a
    fixed seed. Both are written as words joined by single spaces, so only the order tells them apart: a
    bag-of-words model stays at chance, an RNN or BERT must read the sequence."""
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


def read_squad(path: Path, spec: TaskSpec) -> list:
    """SQuAD v1.1 JSON, optionally some of its articles (`file.json#articles=0-37`): recipes/squad.py."""
    from recipes.squad import read_squad as read

    return read(path, spec)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, its label set (fixed, so label ids agree across runs) and how to read it."""

    name: str
    kind: str  # "classify": one label per text; "tag": one tag per word; "translate": a text per text
    # ... "image" or "sentences": inputs an autoencoder rebuilds (ImageExample, str); "span": an answer's start
    # and end in a context (labels: the two logits of each position)
    labels: tuple[str, ...]
    reader: Callable[[Path, TaskSpec], list]
    main_metric: str  # on the dev split: picks the best checkpoint and heads the leaderboard
    suffixes: tuple[str, ...] = ("",)  # the files a configured path stands for
    scheme: str | None = None  # "iob2": entity-level precision/recall/F1 (seqeval)
    default_tag: str | None = None  # the tag of words cut off by max_len (they still count in the metrics)
    higher_is_better: bool = True  # of main_metric (False for a reconstruction error)
    together: bool = False  # the reader gets the bare path and reads all its suffixed files at once (pairs)

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
    splits = {name: spec.read(getattr(cfg, name)) for name in SPLITS if getattr(cfg, name)}
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


def input_files(cfg: TaskConfig, spec: TaskSpec) -> dict[str, list[Path]]:
    return {name: spec.files(getattr(cfg, name)) for name in SPLITS if getattr(cfg, name)}


_WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Words of free text for tagging, close to CoNLL's tokens: punctuation apart, `co-writer`, `U.S` kept."""
    return _WORD.findall(text)


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
    """The project's WordPiece tokenizer (`tokenization.load_tokenizer`), or an HF dir's vocab.txt alone."""

    def __init__(self, directory: str | Path):
        from tokenization import load_tokenizer, special_ids

        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            self.tokenizer = load_tokenizer(directory)
        elif (directory / "vocab.txt").is_file():
            self.tokenizer = _from_vocab_txt(directory)
        else:
            raise BertpipeError(f"{directory}: no tokenizer.json or vocab.txt (set model.vocab_dir)")
        try:
            ids = special_ids(self.tokenizer)
        except ValueError as err:
            raise BertpipeError(f"{directory}: {err}") from None
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


def _from_vocab_txt(directory: Path) -> Tokenizer:
    """An HF BERT directory that ships only vocab.txt: BERT's normalization, lowercased unless it says not."""
    config = directory / "tokenizer_config.json"
    lowercase = json.loads(config.read_text()).get("do_lower_case", True) if config.is_file() else True
    tok = Tokenizer(WordPiece.from_file(str(directory / "vocab.txt"), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


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
    """Features for the collator: input_ids plus `label` (texts) or `word_starts` and `tags` (tagged words)."""
    if not examples:
        return []
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
        batch = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
                 "attention_mask": (torch.arange(input_ids.size(1))[None, :] < lengths[:, None]).long()}
        if features and "label" in features[0]:
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
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
        return DataLoader(self.features[split], batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("dev")
