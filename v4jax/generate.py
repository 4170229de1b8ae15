"""Generation: prompts (token lists) -> new tokens, on the cache of ``v4jax.decode``.

The cache holds the longest prompt plus ``max_new_tokens``, rounded up (``_capacity``) so that
nearby lengths share compiled programs. The prompts are prefilled in chunks of at most
``prefill_chunk`` tokens (each chunk padded to a power of two; rows of different lengths go in one
batch, a row whose prompt has ended takes no tokens). Then each step samples one token per row
(``v4jax.sampling``: per-row temperature, top-k, top-p and seeds, all data, so no setting
recompiles) and appends it with ``extend``: one compiled decode step for the whole generation.
A row stops at one of its ``stop_tokens`` (not included in its result) or after
``max_new_tokens``; the loop ends when every row has.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.chat import EOS_ID  # the DeepSeek-V4 tokenizer's end of sentence: the default stop token
from v4jax.config import ModelConfig
from v4jax.decode import cache_shardings, extend, init_cache
from v4jax.sampling import sample, sampling_params


def _bucket(n: int, smallest: int = 16) -> int:
    """The power of two >= n (and >= smallest)."""
    return max(smallest, 1 << (max(n, 1) - 1).bit_length())


def _capacity(n: int) -> int:
    """Cache length for n tokens: a power of two up to 64K, then a multiple of 64K (a long context
    does not pay up to 2x memory for rounding). Either way a multiple of every compression ratio."""
    return _bucket(n, 128) if n <= 65536 else -(-n // 65536) * 65536


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of prompts (each a list of token ids)")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must be a non-empty list of integer token ids, got {p!r:.80}")
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"prompts[{i}][{j}] = {int(ids[j])} is outside the vocabulary [0, {vocab_size})")
        out.append([int(t) for t in ids])
    return out


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def decode_step(params, cache, logits, sampling, step, active, config: ModelConfig, dtype):
    """Sample a token per row from ``logits`` [b, V] and append it where ``active`` [b] bool:
    -> (tokens [b], the logits after them [b, V], the cache)."""
    tokens = sample(logits, sampling, step)
    logits, cache = extend(params, cache, tokens[:, None], active.astype(jnp.int32), config, dtype)
    return tokens, logits, cache


def generate(params, config: ModelConfig, prompts, max_new_tokens: int, *, temperature=1.0, top_p=1.0, top_k=0,
             seed=0, stop_tokens: Sequence[int] | None = None, dtype=jnp.bfloat16, prefill_chunk: int = 2048,
             on_tokens: Callable[[list[int | None]], None] | None = None, mesh=None,
             fp8_cache: bool = False) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids): a list of token lists.

    ``temperature`` (0: greedy), ``top_p``, ``top_k`` (0: off) and ``seed``: a value for every row
    or a list of one per row. ``stop_tokens``: the ids that end a row (default: EOS, id 1; ``[]``
    for none). ``on_tokens(tokens)``, if given, is called after each step with each row's new token
    (None for a row that has finished): for streaming. ``mesh``: the mesh ``params`` are sharded
    on; the cache is then split by rows (``v4jax.decode.cache_shardings``). ``fp8_cache``: the
    compressed entries' non-RoPE channels kept in FP8 (``v4jax.decode.init_cache``).
    """
    prompts = _check_prompts(prompts, config.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} passes the "
                         f"model's max_position_embeddings={config.max_position_embeddings}: shorten one of them")
    stops = np.asarray([EOS_ID] if stop_tokens is None else list(stop_tokens), np.int64)
    b = len(prompts)
    sp = sampling_params(b, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    lengths = np.array([len(p) for p in prompts])
    # +1: the last sampled token is appended too (it is never read)
    cache = init_cache(config, b, _capacity(int(lengths.max()) + max_new_tokens + 1), dtype, fp8_cache)
    if mesh is not None:
        cache = jax.device_put(cache, cache_shardings(cache, mesh))

    logits = None
    for start in range(0, int(lengths.max()), prefill_chunk):
        n_valid = np.clip(lengths - start, 0, prefill_chunk)
        width = _bucket(int(n_valid.max()))
        chunk = np.zeros((b, width), np.int32)
        for i, p in enumerate(prompts):
            chunk[i, :n_valid[i]] = p[start:start + n_valid[i]]
        lg, cache = extend(params, cache, jnp.asarray(chunk), jnp.asarray(n_valid, jnp.int32), config, dtype)
        ended_here = jnp.asarray(n_valid > 0)[:, None]  # a row's last prompt token was in this chunk
        logits = lg if logits is None else jnp.where(ended_here, lg, logits)

    out: list[list[int]] = [[] for _ in range(b)]
    active = np.ones(b, bool)
    for step in range(max_new_tokens):
        tokens, logits, cache = decode_step(params, cache, logits, sp, jnp.int32(step), jnp.asarray(active),
                                            config, dtype)
        tokens = np.asarray(tokens)
        shown: list[int | None] = [None] * b
        for i in np.flatnonzero(active):
            if np.isin(tokens[i], stops):
                active[i] = False
            else:
                out[i].append(int(tokens[i]))
                shown[i] = int(tokens[i])
        if on_tokens is not None:
            on_tokens(shown)
        if not active.any():
            break
    return out
