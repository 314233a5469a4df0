"""BERT's WordPiece tokenizer, trained and saved with HF `tokenizers`, and loaded from any BERT directory.

A vocabulary trained here puts the special tokens at ids 0-4 ([PAD] [UNK] [CLS] [SEP] [MASK]), then any
[unusedN] slots, then the learned pieces; the saved directory loads with
`transformers.BertTokenizerFast.from_pretrained`. Loading takes any layout: special tokens are found by name
wherever they sit (Google's published vocabularies have [PAD]=0, [unused0..98]=1-99, [UNK]=100, [CLS]=101,
[SEP]=102, [MASK]=103, [unused99..] after), and a directory that ships only vocab.txt gets BERT's
normalization and pre-tokenization around it.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODEL_MAX_LENGTH = 512
_UNUSED = re.compile(r"\[unused\d+\]")


@dataclass(frozen=True)
class SpecialIds:
    """Where a vocabulary keeps its special tokens, and which ids are ordinary pieces.

    `regular[i]` is False for the five specials, every [unusedN] slot (wherever it sits) and any other special
    token the tokenizer declares: those are never chosen for masking nor drawn as random replacements.
    """

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    vocab_size: int
    num_unused: int  # [unusedN] slots anywhere in the vocabulary; never produced by encoding text
    regular: np.ndarray = field(compare=False, repr=False)  # bool per id
    regular_ids: np.ndarray = field(compare=False, repr=False)  # the ids where `regular` is True, ascending

    @property
    def reserved(self) -> list[int]:
        """Every id that is not an ordinary piece (specials and unused slots), ascending."""
        return np.flatnonzero(~self.regular).tolist()


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
    """The fast tokenizer of a vocab directory (bertpipe's or any HF BERT's), padding and truncation off.

    `tokenizer.json` when the directory has one; else `vocab.txt` with BERT's normalization and pre-tokenization,
    lowercased as `tokenizer_config.json` says (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`) or,
    without one, when no entry of the vocabulary changes under lowercasing (the choice is logged).

    Special tokens written in the text ("[MASK]", "[CLS]", "[unused5]") are encoded as the ordinary text they
    are, never as special ids, as Google's original tokenizer does: a corpus or a task cannot inject them.
    """
    directory = Path(vocab_dir)
    path = directory / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    elif (directory / "vocab.txt").is_file():
        tok = _from_vocab_txt(directory)
    elif directory.is_dir():
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {vocab_dir} (run `bertpipe vocab` first)")
    else:
        raise FileNotFoundError(f"vocab directory not found: {vocab_dir} (run `bertpipe vocab` first)")
    tok.no_padding()
    tok.no_truncation()
    tok.encode_special_tokens = True
    return tok


def _from_vocab_txt(directory: Path) -> Tokenizer:
    """BERT's tokenizer around a bare vocab.txt, as `transformers.BertTokenizerFast` builds it."""
    lines = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {}
    for i, token in enumerate(lines):
        vocab.setdefault(token, i)  # a duplicate line keeps its first id, as BERT's load_vocab does
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{directory / 'vocab.txt'} lacks the special token(s) {', '.join(missing)}")
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{config_path}: not JSON: {err}") from None
    if "do_lower_case" in config:
        lowercase = bool(config["do_lower_case"])
    else:
        cased = sum(1 for t in vocab if not t.startswith("[") and t != t.lower())
        lowercase = cased == 0
        log.info("%s: vocab.txt without a tokenizer_config.json stating do_lower_case: %s, since %s",
                 directory, "lowercasing (uncased)" if lowercase else "keeping case (cased)",
                 "none of its entries has an uppercase letter" if lowercase
                 else f"{cased} of its entries have uppercase letters")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def special_ids(tok: Tokenizer) -> SpecialIds:
    """The ids of the special tokens, found by name, and the mask of ordinary pieces."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the vocabulary lacks the special token(s) {', '.join(missing)}")
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    regular = np.ones(size, dtype=bool)
    present = np.zeros(size, dtype=bool)
    present[list(vocab.values())] = True
    regular &= present  # an id no token names (a gap) is never drawn
    unused = [i for t, i in vocab.items() if _UNUSED.fullmatch(t)]
    declared = [i for i, added in tok.get_added_tokens_decoder().items() if added.special]
    regular[[*ids.values(), *unused, *declared]] = False
    return SpecialIds(*ids.values(), vocab_size=size, num_unused=len(unused), regular=regular,
                      regular_ids=np.flatnonzero(regular))
