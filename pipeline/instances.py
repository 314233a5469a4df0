"""Pretraining instances by BERT's original algorithm (create_pretraining_data.py), on token-id arrays.

A document is a list of tokenized sentences. Segment A is one or more whole sentences; segment B is either
the sentences that actually follow (IsNext) or sentences from a random other document (NotNext); the pair is
truncated from the longer side at a random end, then laid out as `[CLS] A [SEP] B [SEP]`.

Instances are kept as token ranges into one flat array of the chunk's tokens, so building them never copies
token lists in Python; `gather` materializes them with numpy at the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import blingfire
import numpy as np

IS_NEXT, NOT_NEXT = 0, 1  # HF's next_sentence_label convention: 0 means B continues A


def split_sentences(text: str) -> list[str]:
    """Sentences of a document (paragraphs separated by newlines), by blingfire.

    One call per document: blingfire reads a newline as a space, so paragraph ends become U+2029
    (PARAGRAPH SEPARATOR), which it always ends a sentence on; that is twice as fast as a call per paragraph.
    """
    sentences = blingfire.text_to_sentences(text.replace("\n", _PARAGRAPH)).split("\n")
    return [s for s in (t.strip(_STRIP) for t in sentences) if s]


_PARAGRAPH = "\u2029"
_STRIP = "\u2029 "


@dataclass
class Instance:
    a: tuple[int, int]  # token range [start, end) in the flat array
    b: tuple[int, int]
    label: int
    doc_a: int  # document index within the chunk
    doc_b: int
    sents_a: tuple[int, int]  # sentence indices within the document, [first, last]
    sents_b: tuple[int, int]
    target: int  # the target length drawn for this instance (max_seq_len - 3 unless short)


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """BERT's truncate_seq_pair in closed form: trim the longer range (B on a tie) one token at a time,
    each token from the front or the back with probability 1/2."""
    len_a, len_b = a[1] - a[0], b[1] - b[0]
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return
    gap = abs(len_a - len_b)
    first = min(excess, gap)  # from the longer side until both are equal
    rest = excess - first  # then alternately, B first (a tie trims B)
    cut_a = (first if len_a > len_b else 0) + rest // 2
    cut_b = (first if len_a <= len_b else 0) + rest - rest // 2
    for rng_range, cut in ((a, cut_a), (b, cut_b)):
        front = rng.getrandbits(cut).bit_count() if cut else 0  # how many of the coin flips said "front"
        rng_range[0] += front
        rng_range[1] -= cut - front


def document_instances(
    doc: int,
    starts: list[np.ndarray],
    lengths: list[np.ndarray],
    max_seq_len: int,
    short_seq_prob: float,
    rng: random.Random,
) -> list[Instance]:
    """Instances of document `doc`; `starts[d]`/`lengths[d]` are its sentences' token offsets and lengths.

    The target length is drawn again after every instance, so `short_seq_prob` is the share of instances
    with a short target (the original draws once per document).
    """
    max_tokens = max_seq_len - 3
    sent_start, sent_len = starts[doc], lengths[doc]
    n_sent = len(sent_len)

    def target() -> int:
        return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens

    out: list[Instance] = []
    target_len = target()
    chunk_first, chunk_len, i = 0, 0, 0
    while i < n_sent:
        chunk_len += int(sent_len[i])
        if i == n_sent - 1 or chunk_len >= target_len:
            n_chunk = i - chunk_first + 1
            random_next = rng.random() < 0.5
            if not random_next and n_chunk == 1:
                # IsNext needs a B. The original forces NotNext here, which skews the labels (about 48% IsNext
                # on Wikipedia); take the next sentence as B instead, or drop a document's lone last sentence.
                if i + 1 == n_sent:
                    break
                i += 1
                n_chunk = 2
            a_end = rng.randint(1, n_chunk - 1) if n_chunk >= 2 else 1  # sentences of the chunk that go to A
            a_last = chunk_first + a_end - 1
            a = [int(sent_start[chunk_first]), int(sent_start[a_last] + sent_len[a_last])]
            sents_a = (chunk_first, a_last)
            if random_next:
                label = NOT_NEXT
                other = rng.randrange(len(starts) - 1)
                other += other >= doc  # a random document other than this one
                o_start, o_len = starts[other], lengths[other]
                first = rng.randrange(len(o_len))
                want, last = target_len - (a[1] - a[0]), first
                total = int(o_len[first])
                while total < want and last + 1 < len(o_len):
                    last += 1
                    total += int(o_len[last])
                b = [int(o_start[first]), int(o_start[first]) + total]
                doc_b, sents_b = other, (first, last)
                i -= n_chunk - a_end  # the unused sentences of this chunk start the next one
            else:
                label = IS_NEXT
                last = i
                b = [int(sent_start[chunk_first + a_end]), int(sent_start[last] + sent_len[last])]
                doc_b, sents_b = doc, (chunk_first + a_end, last)
            _truncate_pair(a, b, max_tokens, rng)
            if a[1] > a[0] and b[1] > b[0]:
                out.append(Instance((a[0], a[1]), (b[0], b[1]), label, doc, doc_b, sents_a, sents_b, target_len))
            chunk_first, chunk_len = i + 1, 0
            target_len = target()
        i += 1
    return out


def gather(flat: np.ndarray, instances: list[Instance], cls: int, sep: int) -> tuple[np.ndarray, ...]:
    """(offsets, input_ids, token_type_ids) of `[CLS] A [SEP] B [SEP]` for every instance, as flat arrays."""
    a = np.array([x.a for x in instances], dtype=np.int64).reshape(-1, 2)
    b = np.array([x.b for x in instances], dtype=np.int64).reshape(-1, 2)
    len_a, len_b = a[:, 1] - a[:, 0], b[:, 1] - b[:, 0]
    lengths = len_a + len_b + 3
    offsets = np.zeros(len(instances) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # For every output position: which source token it copies (or -1/-2 for [CLS]/[SEP]).
    pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    la, lb = np.repeat(len_a, lengths), np.repeat(len_b, lengths)
    src_a, src_b = np.repeat(a[:, 0], lengths), np.repeat(b[:, 0], lengths)
    in_a = (pos >= 1) & (pos <= la)
    in_b = (pos >= la + 2) & (pos < la + 2 + lb)
    ids = np.full(offsets[-1], sep, dtype=np.int32)
    ids[pos == 0] = cls
    ids[in_a] = flat[(src_a + pos - 1)[in_a]]
    ids[in_b] = flat[(src_b + pos - la - 2)[in_b]]
    types = (pos >= la + 2).astype(np.int8)
    return offsets, ids, types
