"""Tokenizers: byte-level (the built-in corpus's: ids are bytes, 256 ends a document) or any
``tokenizer.json`` of the `tokenizers` library (Rust), user-given or a byte-level BPE trained
on the input. ``tokenizers`` is an optional dependency: ``pip install moecore[data]``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from moecore.errors import DataError

#: The end-of-document token a trained BPE gets (id 0), as GPT-2's.
EOD_TOKEN = "<|endoftext|>"
#: End-of-document tokens looked for, in this order, in a user's tokenizer.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>", "[SEP]")


def require_tokenizers() -> Any:
    """The ``tokenizers`` module, or a :class:`DataError` saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "this needs the `tokenizers` library: pip install moecore[data]  "
            "(or pip install tokenizers)"
        ) from None
    return tokenizers


class Tokenizer(Protocol):
    """What moecore needs of a tokenizer."""

    kind: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (the end-of-document token dropped)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255 and id 256 between documents (vocabulary 257)."""

    kind = "bytes"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The bytes among ``ids`` as UTF-8 (malformed sequences replaced)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class TokenizersTokenizer:
    """A ``tokenizers.Tokenizer`` and its end-of-document id."""

    kind = "tokenizers"

    def __init__(self, inner: Any, eod_id: int) -> None:
        self.inner = inner
        self.eod_id = eod_id
        self.vocab_size = int(inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self.inner.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``."""
        return str(self.inner.decode(list(ids), skip_special_tokens=True))

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text."""
        return str(self.inner.to_str())


def tokenizer_from_json(text: str, eod: str | None = None, source: str = "tokenizer") -> Any:
    """A :class:`TokenizersTokenizer` from ``tokenizer.json`` text; ``eod`` names the
    end-of-document token (default: the first of :data:`EOD_CANDIDATES` it knows)."""
    tk = require_tokenizers()
    try:
        inner = tk.Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises its own exception type
        raise DataError(
            f"{source} is not a tokenizer.json the tokenizers library reads: {exc}"
        ) from None
    names = [eod] if eod else list(EOD_CANDIDATES)
    for name in names:
        token_id = inner.token_to_id(name)
        if token_id is not None:
            return TokenizersTokenizer(inner, int(token_id))
    wanted = f"the token {eod!r}" if eod else f"any of {list(EOD_CANDIDATES)}"
    raise DataError(
        f"{source} has no end-of-document token ({wanted} is not in its vocabulary): "
        "name one with --eod TOKEN"
    )


def load_tokenizer(spec: str, eod: str | None = None) -> Any:
    """``"bytes"`` or the path of a ``tokenizer.json``."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--tokenizer {spec}: no such file (give a tokenizer.json or 'bytes')")
    return tokenizer_from_json(path.read_text(encoding="utf-8"), eod, source=str(path))


def train_bpe(texts: Iterator[str], vocab_size: int) -> TokenizersTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenization, lossless for any text) of ``vocab_size``
    ids, learnt from ``texts``; :data:`EOD_TOKEN` is id 0."""
    tk = require_tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise DataError(
            f"--train-bpe {vocab_size}: a byte-level BPE needs at least {len(alphabet) + 1} ids "
            "(256 bytes and the end-of-document token)"
        )
    inner = tk.Tokenizer(tk.models.BPE())
    inner.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer)
    return TokenizersTokenizer(inner, int(inner.token_to_id(EOD_TOKEN)))


def tokenizer_record(tok: Any) -> dict[str, Any]:
    """How an index names a tokenizer: its kind, vocabulary, end-of-document id and (for a
    ``tokenizers`` one) the SHA-256 of its JSON."""
    record: dict[str, Any] = {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    if tok.kind == "tokenizers":
        text = tok.to_json()
        record["file"] = "tokenizer.json"
        record["sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return record


def tokenizer_of_record(record: dict[str, Any], folder: Path) -> Any:
    """The tokenizer an index's record names (its ``tokenizer.json`` read from ``folder``)."""
    if record.get("kind") == "bytes":
        return ByteTokenizer()
    if record.get("kind") != "tokenizers":
        raise DataError(f"{folder}: unknown tokenizer kind {record.get('kind')!r}")
    path = folder / str(record.get("file", "tokenizer.json"))
    if not path.is_file():
        raise DataError(f"{path} is missing (the index names it as the tokenizer)")
    text = path.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != record.get("sha256"):
        raise DataError(
            f"{path} does not match the SHA-256 its index records (damaged or replaced)"
        )
    tok = TokenizersTokenizer(require_tokenizers().Tokenizer.from_str(text), int(record["eod_id"]))
    return tok


def describe(record: dict[str, Any]) -> str:
    """A few words for a tokenizer record."""
    if record.get("kind") == "bytes":
        return "bytes"
    return f"tokenizer.json (sha256 {str(record.get('sha256', ''))[:12]})"


def run_tokenizer(run_dir: Path) -> Any:
    """The tokenizer a run saved (``run_dir/tokenizer.json``, for decoding), or None: the
    run's tokens are bytes."""
    path = run_dir / "tokenizer.json"
    if not path.is_file():
        return None
    inner = require_tokenizers().Tokenizer.from_str(path.read_text(encoding="utf-8"))
    return TokenizersTokenizer(inner, -1)
