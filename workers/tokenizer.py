"""Tokenizers: byte-level by default, or a Hugging Face ``tokenizer.json``.

The byte-level tokenizer needs no download: ids 0-255 are the UTF-8 bytes and
256 is the end-of-document token.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from service.config import ConfigError

BYTE_VOCAB_SIZE = 257
BYTE_EOS_ID = 256


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    name: str

    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)


class HuggingFaceTokenizer:
    """A ``tokenizers`` tokenizer loaded from a local ``tokenizer.json`` (never from a hub)."""

    def __init__(self, path: str, data: bytes):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as error:
            raise ConfigError(
                f"data.tokenizer={path!r} needs the 'tokenizers' package; install it with "
                "`pip install 'stalwart[data]'` or use data.tokenizer=byte"
            ) from error
        self._tokenizer = HFTokenizer.from_str(data.decode("utf-8"))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = f"hf:{path}"
        eos = None
        for candidate in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]"):
            eos = self._tokenizer.token_to_id(candidate)
            if eos is not None:
                break
        if eos is None:
            raise ConfigError(
                f"data.tokenizer={path!r} has no end-of-document token (looked for </s>, <|endoftext|>, "
                "<|end_of_text|>, <eos>, [SEP]); add one to the tokenizer"
            )
        self.eos_id = eos

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def load_tokenizer(spec: str, storage_options: dict | None = None) -> Tokenizer:
    """Return the tokenizer named by ``data.tokenizer``: ``byte`` or a tokenizer.json path or URI."""
    if spec == "byte":
        return ByteTokenizer()
    import fsspec

    try:
        with fsspec.open(spec, "rb", **(storage_options or {})) as handle:
            data = handle.read()
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.tokenizer={spec!r} cannot be read ({error}); give 'byte' or the path of a tokenizer.json") from error
    return HuggingFaceTokenizer(spec, data)
