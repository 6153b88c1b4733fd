"""Corpora, byte tokenization and batching."""

from __future__ import annotations

from moecore.data.batches import train_batch, val_batches, windows
from moecore.data.corpus import Corpus, DataError, builtin_corpus, load_corpus

__all__ = [
    "Corpus",
    "DataError",
    "builtin_corpus",
    "load_corpus",
    "train_batch",
    "val_batches",
    "windows",
]
