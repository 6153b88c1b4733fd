"""Corpora, tokenizers, prepared (memory-mapped) token shards, mixtures and batching."""

from __future__ import annotations

from moecore.data.batches import train_batch, val_batches, windows
from moecore.data.corpus import Corpus, DataError, builtin_corpus, load_corpus, open_prepared
from moecore.data.mixture import (
    Mixture,
    as_mixture,
    data_vocab_size,
    load_data,
    mixture_from_table,
    parse_data_spec,
)
from moecore.data.shards import TokenView, is_prepared

__all__ = [
    "Corpus",
    "DataError",
    "Mixture",
    "TokenView",
    "as_mixture",
    "builtin_corpus",
    "data_vocab_size",
    "is_prepared",
    "load_corpus",
    "load_data",
    "mixture_from_table",
    "open_prepared",
    "parse_data_spec",
    "train_batch",
    "val_batches",
    "windows",
]
