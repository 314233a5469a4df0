"""Dynamic MLM masking at load time, vectorized over the batch with numpy.

Of the non-special tokens of each sequence, 15% are chosen (stochastic rounding, so the share is exact in
expectation even for short sequences; at least one, as Google's create_pretraining_data.py, and at most
`max_predictions`); of those 80% become [MASK], 10% a random non-special token and 10% stay. [CLS], [SEP],
[PAD] and the other specials are never chosen. The collator returns the chosen positions so that the model
evaluates its MLM head on those only; with `pad_to` set every batch has one shape, prediction slots included
(`max_predictions` of them), which is what `torch.compile` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenization import SpecialIds


@dataclass
class MaskingConfig:
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8  # of the chosen tokens: replaced by [MASK]
    random_fraction: float = 0.1  # replaced by a random token; the rest stay as they are
    max_predictions: int = 20  # per sequence: 20 at seq 128, 80 at 512
    whole_word: bool = False  # choose whole words: a word's ## pieces are chosen with it
    pad_to: int = 0  # pad every batch to this length (and to max_predictions slots); 0 pads to the batch's longest

    def __post_init__(self) -> None:
        if not 0 < self.mlm_probability < 1 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mlm_probability must be within (0, 1) and mask + random fractions at most 1")


class MLMCollator:
    """Pads a batch of unmasked rows and masks it with the caller's generator: every draw is shaped (rows, ...),
    so a generator keyed per row (dataset.RowRandom) masks each row alike in any batch."""

    def __init__(self, special: SpecialIds, cfg: MaskingConfig, continuation: np.ndarray | None = None):
        self.special, self.cfg = special, cfg
        if cfg.pad_to and cfg.max_predictions < 1:
            raise ValueError("pad_to needs max_predictions >= 1: it fixes the number of prediction slots")
        if cfg.whole_word and continuation is None:
            raise ValueError("whole-word masking needs the vocabulary's ## continuation flags")
        self.continuation = continuation  # bool per vocabulary id: the piece starts with ##
        # Both common layouts (bertpipe's and Google's) keep every reserved id below the first ordinary piece:
        # then a comparison tells candidates apart, else a lookup in the per-id mask.
        regular = special.regular_ids
        contiguous = len(regular) and regular[-1] == len(special.regular) - 1 and \
            regular[-1] - regular[0] + 1 == len(regular)
        self.first_regular = int(regular[0]) if contiguous else None

    def __call__(self, input_ids: list[np.ndarray], token_type_ids: list[np.ndarray], nsp_labels: np.ndarray,
                 rng: np.random.Generator) -> dict[str, torch.Tensor]:
        cfg, sp = self.cfg, self.special
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        width = max(int(lengths.max()), cfg.pad_to)
        batch = len(input_ids)
        ids = np.full((batch, width), sp.pad, dtype=np.int64)
        types = np.zeros((batch, width), dtype=np.int64)
        for i, (row, row_types) in enumerate(zip(input_ids, token_type_ids, strict=True)):
            ids[i, : len(row)] = row
            types[i, : len(row)] = row_types
        attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)

        # pads, specials and unused slots (wherever they sit) are never chosen
        candidate = ids >= self.first_regular if self.first_regular is not None else sp.regular[ids]
        n_candidates = candidate.sum(axis=1)
        budget = np.floor(n_candidates * cfg.mlm_probability + rng.random(batch)).astype(np.int64)
        # at least one prediction per row that has a candidate (a row of two short segments would otherwise
        # often draw none, and a batch of such rows would have no MLM loss at all), at most max_predictions
        budget = np.minimum(np.maximum(budget, n_candidates > 0), cfg.max_predictions)
        chosen = self._choose_words(ids, candidate, budget, rng) if cfg.whole_word else \
            self._choose_tokens(candidate, budget, rng)

        # chosen positions, ascending, padded with 0 (label -100) to the batch's most, or to max_predictions
        # with pad_to (one shape for every batch)
        n_chosen = chosen.sum(axis=1)
        slots = cfg.max_predictions if cfg.pad_to else max(int(n_chosen.max()), 1)
        order = np.argsort(~chosen, axis=1, kind="stable")[:, :slots]
        valid = np.arange(slots)[None, :] < n_chosen[:, None]
        positions = np.where(valid, order, 0)
        rows = np.arange(batch)[:, None]
        labels = np.where(valid, ids[rows, positions], -100)

        draw = rng.random((batch, slots))
        to_mask = valid & (draw < cfg.mask_fraction)
        to_random = valid & (draw >= cfg.mask_fraction) & (draw < cfg.mask_fraction + cfg.random_fraction)
        rr, cc = np.nonzero(to_mask)
        ids[rr, positions[rr, cc]] = sp.mask
        drawn = rng.integers(0, len(sp.regular_ids), size=(batch, slots))  # an ordinary piece, uniformly, per row
        rr, cc = np.nonzero(to_random)
        drawn = drawn[rr, cc]
        ids[rr, positions[rr, cc]] = drawn + self.first_regular if self.first_regular is not None else \
            sp.regular_ids[drawn]
        return {
            "input_ids": torch.from_numpy(ids),
            "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(attention),
            "mlm_positions": torch.from_numpy(positions),
            "mlm_labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(np.asarray(nsp_labels, dtype=np.int64)),
        }

    @staticmethod
    def _choose_tokens(candidate: np.ndarray, budget: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        keys = np.where(candidate, rng.random(candidate.shape), 2.0)
        rank = np.argsort(np.argsort(keys, axis=1), axis=1)
        return candidate & (rank < budget[:, None])

    def _choose_words(self, ids: np.ndarray, candidate: np.ndarray, budget: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        """Whole words in random order, each taken if it still fits the budget; a word never splits."""
        batch, width = ids.shape
        after_special = np.ones_like(candidate)
        after_special[:, 1:] = ~candidate[:, :-1]
        starts = candidate & (~self.continuation[ids] | after_special)  # a ## piece after [SEP] starts its own
        word = np.cumsum(starts, axis=1) - 1  # word index of every token (valid where candidate)
        word = np.where(candidate & (word >= 0), word, width)  # non-candidates go to a dummy word
        flat = (np.arange(batch)[:, None] * (width + 1) + word).ravel()
        sizes = np.bincount(flat, minlength=batch * (width + 1)).reshape(batch, width + 1)
        sizes[:, width] = 0
        keys = np.where(sizes > 0, rng.random(sizes.shape), 2.0)
        order = np.argsort(keys, axis=1)  # the words in random order, the empty ones last
        ordered = np.take_along_axis(sizes, order, axis=1)
        picked_sorted = self._fill(ordered, budget)
        picked = np.zeros_like(picked_sorted)
        np.put_along_axis(picked, order, picked_sorted, axis=1)
        return candidate & np.take_along_axis(picked, word, axis=1)

    @staticmethod
    def _fill(sizes: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """Which words (sizes in the order they are tried) to take: each one that still fits the budget, a
        word that does not fit passed over for the next (as Google's create_pretraining_data.py does).

        The words that fit in order are taken at once; the rest is a loop over word columns, vectorized over
        the batch, that stops when no row has budget left for any of its remaining words.
        """
        running = np.cumsum(sizes, axis=1)
        take = (running <= budget[:, None]) & (sizes > 0)
        left = budget - np.where(take, sizes, 0).sum(axis=1)
        # the smallest word from each column on: nothing past column k fits a row with less budget than that
        big = np.iinfo(sizes.dtype).max
        smallest = np.minimum.accumulate(np.where(sizes > 0, sizes, big)[:, ::-1], axis=1)[:, ::-1]
        first = int(np.argmax(~take.all(axis=0))) if not take.all() else sizes.shape[1]
        for k in range(first, sizes.shape[1]):
            if not (left >= smallest[:, k]).any():
                break
            fits = ~take[:, k] & (sizes[:, k] > 0) & (sizes[:, k] <= left)
            take[:, k] |= fits
            left -= np.where(fits, sizes[:, k], 0)
        return take


def continuation_flags(tokenizer) -> np.ndarray:
    """For every vocabulary id: whether its piece is a `##` continuation (for whole-word masking)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    flags = np.zeros(len(vocab), dtype=bool)
    for token, i in vocab.items():
        flags[i] = token.startswith("##")
    return flags
