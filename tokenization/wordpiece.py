"""BERT's WordPiece tokenizer, trained and saved with HF `tokenizers`.

The special tokens sit at fixed ids 0-4 ([PAD] [UNK] [CLS] [SEP] [MASK]), then any [unusedN] slots, then
the learned pieces; the saved directory loads with `transformers.BertTokenizerFast.from_pretrained`.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODEL_MAX_LENGTH = 512


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    vocab_size: int
    num_unused: int  # [unusedN] slots right after the specials; never produced by encoding plain text

    @property
    def first_regular(self) -> int:
        """The first id a random-token replacement may draw (after specials and unused slots)."""
        return len(SPECIAL_TOKENS) + self.num_unused


def _empty_tokenizer(lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK)


_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _count_chars(batches: Iterable[str] | Iterable[list[str]], flush_chars: int = 8_000_000) -> dict[str, int]:
    """Count every code point of the raw texts with numpy (one bincount per ~8M characters)."""
    counts = np.zeros(0x110000, dtype=np.int64)
    buf: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            points = np.frombuffer("".join(buf).encode("utf-32-le"), dtype=np.uint32)
            np.add(counts, np.bincount(points, minlength=0x110000), out=counts)
        buf, size = [], 0

    for item in batches:
        for text in [item] if isinstance(item, str) else item:
            buf.append(text)
            size += len(text)
        if size >= flush_chars:
            flush()
    flush()
    return {chr(cp): int(counts[cp]) for cp in np.nonzero(counts)[0]}


def _alphabet(raw_counts: dict[str, int], normalizer, limit: int) -> list[str]:
    """The trainer's alphabet: the `limit` most frequent normalized characters (ties at the cut kept).

    Normalization (BERT's: clean, lowercase, strip accents, space around CJK) acts character by character,
    so the counts of the normalized text follow from the raw counts without normalizing the corpus.
    """
    counts: dict[str, int] = {}
    for ch, n in raw_counts.items():
        for out in normalizer.normalize_str(ch):
            if not out.isspace():
                counts[out] = counts.get(out, 0) + n
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) > limit:
        cut = ranked[limit - 1][1]
        ranked = [kv for kv in ranked if kv[1] >= cut]
    return sorted(ch for ch, _ in ranked)


def train_wordpiece(
    texts: Callable[[], Iterable[str] | Iterable[list[str]]],
    vocab_size: int = 30_000,
    *,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    min_frequency: int = 2,
    limit_alphabet: int = 1000,
    num_unused: int = 0,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a WordPiece vocabulary of `vocab_size` entries (specials and unused slots included).

    `texts()` returns a fresh iterator of strings or batches of strings; it is streamed twice, never
    copied to disk. `strip_accents=None` follows `lowercase`, as in BERT's uncased models.

    Determinism: HF's trainer gives `##x` continuation pieces ids in hash-map order, which changes merge
    tie-breaks from run to run (huggingface/tokenizers#1794). A first pass counts characters so that the
    alphabet and every `##x` piece get sorted ids before training; the result is byte-identical per input.
    """
    tok = _empty_tokenizer(lowercase, strip_accents)
    alphabet = _alphabet(_count_chars(texts()), tok.normalizer, limit_alphabet)
    continuations = [f"##{ch}" for ch in alphabet if not (_is_punctuation(ch) or _is_cjk(ch))]
    specials = list(SPECIAL_TOKENS) + [f"[unused{i}]" for i in range(num_unused)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        special_tokens=specials + continuations,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    # Rebuild with only the real specials as added tokens: the pinned ## pieces are ordinary vocabulary.
    vocab = tok.get_vocab(with_added_tokens=True)
    final = _empty_tokenizer(lowercase, strip_accents)
    final.model = models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                   max_input_chars_per_word=100)
    final.add_special_tokens(specials)
    cls, sep = final.token_to_id("[CLS]"), final.token_to_id("[SEP]")
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return final


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, *, lowercase: bool, strip_accents: bool | None) -> None:
    """Write tokenizer.json, vocab.txt and the HF config files into `out_dir` (which must exist)."""
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("tokenizer ids are not contiguous; cannot write vocab.txt")
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "strip_accents": strip_accents,
        "tokenize_chinese_chars": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")


def load_tokenizer(vocab_dir: str | Path) -> Tokenizer:
    """The fast tokenizer of a vocab directory, with padding and truncation off."""
    path = Path(vocab_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {vocab_dir} (run `bertpipe vocab` first)")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_ids(tok: Tokenizer) -> SpecialIds:
    """The ids of the special tokens, checked to be BERT's fixed layout."""
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(f"special tokens are not at ids 0-4: {dict(zip(SPECIAL_TOKENS, ids, strict=True))}")
    unused = 0
    while tok.token_to_id(f"[unused{unused}]") is not None:
        unused += 1
    return SpecialIds(*ids, vocab_size=tok.get_vocab_size(with_added_tokens=True), num_unused=unused)
