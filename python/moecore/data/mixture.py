"""The training data of a run: one corpus, or several sampled by weight.

``data = "0.7:DIR_A,0.3:DIR_B"`` (a weight before each source; a source alone has weight 1).
Each row of a batch picks its source from a generator seeded by (seed, step, micro-batch), so
batches never depend on what came before and a resumed run sees the very same rows."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moecore.data.batches import val_batches, windows
from moecore.data.corpus import Corpus, load_corpus
from moecore.data.shards import is_prepared, read_index
from moecore.errors import DataError

_WEIGHTED = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*:(.+)")


def parse_data_spec(spec: str) -> list[tuple[float, str]]:
    """``"0.7:a,0.3:b"`` → ``[(0.7, "a"), (0.3, "b")]``; ``"a"`` → ``[(1.0, "a")]``; ``""``
    → ``[]`` (the built-in corpus). Raises ValueError naming a bad weight or an empty source."""
    if not spec.strip():
        return []
    if "," not in spec and not _WEIGHTED.fullmatch(spec):
        return [(1.0, spec)]
    sources = []
    for item in spec.split(","):
        m = _WEIGHTED.fullmatch(item)
        weight, path = (float(m.group(1)), m.group(2).strip()) if m else (1.0, item.strip())
        if not path:
            raise ValueError(f"empty source in {spec!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight of {path!r} must be > 0, got {weight}")
        sources.append((weight, path))
    return sources


def mixture_from_table(table: dict[str, Any]) -> str:
    """A TOML table ``{"DIR_A" = 0.7, "DIR_B" = 0.3}`` as a ``data`` string; ValueError
    naming a weight that is not a number > 0."""
    parts = []
    for path, weight in table.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"weight of {path!r} must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight of {path!r} must be > 0, got {weight}")
        if "," in path:
            raise ValueError(f"source {path!r}: a path in a mixture cannot hold a comma")
        parts.append(f"{float(weight)!r}:{path}")
    if not parts:
        raise ValueError("the mixture table names no source")
    return ",".join(parts)


def data_vocab_size(spec: str) -> int | None:
    """The largest vocabulary named by the prepared folders of ``spec`` (their indexes only
    are read), or None when it names none or cannot be read (loading reports why)."""
    try:
        sources = parse_data_spec(spec)
        sizes = [int(read_index(Path(p))["vocab_size"]) for _, p in sources if is_prepared(p)]
    except (ValueError, DataError, OSError):
        return None
    return max(sizes) if sizes else None


@dataclass(frozen=True)
class Mixture:
    """Corpora and their sampling weights (normalised to sum 1)."""

    corpora: tuple[Corpus, ...]
    weights: tuple[float, ...]

    @property
    def vocab_size(self) -> int:
        """The largest vocabulary of the sources."""
        return max(c.vocab_size for c in self.corpora)

    @property
    def tokenizer(self) -> dict[str, Any] | None:
        """The sources' tokenizer record (they share one)."""
        return self.corpora[0].tokenizer

    @property
    def digest(self) -> str:
        """A short content hash of the sources and weights."""
        if len(self.corpora) == 1:
            return self.corpora[0].digest
        text = ",".join(f"{w!r}:{c.digest}" for c, w in zip(self.corpora, self.weights))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """The sources' names with their weights."""
        if len(self.corpora) == 1:
            return self.corpora[0].name
        return ", ".join(f"{w:.3g}:{c.name}" for c, w in zip(self.corpora, self.weights))

    def describe(self) -> str:
        """One line per source."""
        if len(self.corpora) == 1:
            return self.corpora[0].describe()
        return "mixture\n" + "\n".join(
            f"  {w:6.1%}  {c.describe()}" for c, w in zip(self.corpora, self.weights)
        )

    def check_length(self, seq_len: int) -> None:
        """Raises :class:`DataError` unless every source's splits hold a sequence."""
        for c in self.corpora:
            c.check_length(seq_len)

    def sources_of(self, batch_size: int, seed: int, step: int, micro: int = 0) -> np.ndarray:
        """Which source each row of the batch of (seed, step, micro) comes from."""
        rng = np.random.default_rng([seed, step, micro])
        return self._draw(rng, batch_size)[0]

    def _draw(
        self, rng: np.random.Generator, batch_size: int, seq_len: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(self.corpora) == 1:
            # The draw of data.train_batch: a single corpus trains as it always has.
            n = len(self.corpora[0].train)
            return np.zeros(batch_size, np.int64), rng.integers(0, n - seq_len, size=batch_size)
        source = rng.choice(len(self.corpora), size=batch_size, p=np.asarray(self.weights))
        starts = np.zeros(batch_size, np.int64)
        for s, corpus in enumerate(self.corpora):
            rows = np.flatnonzero(source == s)
            starts[rows] = rng.integers(0, len(corpus.train) - seq_len, size=rows.size)
        return source, starts

    def train_batch(
        self,
        seq_len: int,
        batch_size: int,
        seed: int,
        step: int,
        micro: int = 0,
        rows: slice | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``rows`` (default all) of the training batch of (seed, step, micro): only
        those windows are read, so a data-parallel rank touches only its own."""
        rng = np.random.default_rng([seed, step, micro])
        source, starts = self._draw(rng, batch_size, seq_len)
        keep = np.arange(batch_size)[rows if rows is not None else slice(None)]
        x = np.empty((keep.size, seq_len), np.int64)
        y = np.empty((keep.size, seq_len), np.int64)
        for s, corpus in enumerate(self.corpora):
            mine = np.flatnonzero(source[keep] == s)
            if mine.size:
                x[mine], y[mine] = windows(corpus.train, starts[keep[mine]], seq_len)
        return x, y

    def val_batches(
        self, seq_len: int, batch_size: int, n_batches: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each source's fixed validation batches, one after the other (the validation loss
        is their mean: every source weighs the same)."""
        out = []
        for c in self.corpora:
            out.extend(val_batches(c.val, seq_len, batch_size, n_batches))
        return out


def as_mixture(data: Corpus | Mixture) -> Mixture:
    """A corpus as a mixture of one; a mixture as it is."""
    return data if isinstance(data, Mixture) else Mixture((data,), (1.0,))


def load_data(spec: str, vocab_size: int | None = None, verify: bool = True) -> Mixture:
    """The data a ``data`` setting names: the built-in corpus (``""``), one source, or a
    weighted mixture of sources that share a tokenizer."""
    try:
        sources = parse_data_spec(spec)
    except ValueError as exc:
        raise DataError(f"data {spec!r}: {exc}") from None
    if not sources:
        return as_mixture(load_corpus(None))
    corpora = tuple(load_corpus(path, vocab_size, verify) for _, path in sources)
    _check_same_tokenizer(corpora)
    total = sum(w for w, _ in sources)
    return Mixture(corpora, tuple(w / total for w, _ in sources))


def _check_same_tokenizer(corpora: Sequence[Corpus]) -> None:
    def key(c: Corpus) -> Any:
        t = c.tokenizer
        return None if t is None else (t.get("kind"), t.get("sha256"), t.get("eod_id"))

    first = key(corpora[0])
    for c in corpora[1:]:
        if key(c) != first:
            raise DataError(
                f"the sources of a mixture must share a tokenizer: {corpora[0].name} and "
                f"{c.name} do not"
            )
