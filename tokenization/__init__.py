"""WordPiece vocabularies: train one from any iterator of texts, save it in HF's layout, load it back.

This package imports nothing else of bertpipe's: it is the bottom layer.
"""

from tokenization.wordpiece import (
    SPECIAL_TOKENS,
    SpecialIds,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_wordpiece,
)

__all__ = ["SPECIAL_TOKENS", "SpecialIds", "load_tokenizer", "save_tokenizer", "special_ids", "train_wordpiece"]
