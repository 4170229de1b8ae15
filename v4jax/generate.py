"""Generation: prompts (token lists) -> new tokens, on the cache of ``v4jax.decode``.

The cache holds the longest prompt plus ``max_new_tokens``, rounded up (``_capacity``) so that
nearby lengths share compiled programs. The prompts are prefilled in chunks of at most
``prefill_chunk`` tokens (each chunk padded to a power of two; rows of different lengths go in one
batch, a row whose prompt has ended takes no tokens).

Then the tokens are generated on the device: ``decode_tokens`` runs up to ``stream_every`` steps in
one ``jax.lax.while_loop`` (sample a token per row, append it, stop a row at one of its stop tokens,
stop the loop when every row has stopped) and only then returns to the host, which streams the
chunk (``on_tokens``) and calls again while rows and budget remain. Sampling (``v4jax.sampling``:
per-row temperature, top-k, top-p and seeds) is data, so no setting recompiles, with one exception:
whether every row is greedy is read on the host and picks one of two programs (the argmax, or the
draw), because a run-time branch would make XLA on a GPU read its predicate on the host at every
step. One compiled loop serves the whole generation. Step i of a row draws with the key of
(seed, row, i), as one step at a time from the host did.

``speculative="mtp"``: self-speculative decoding with the MTP block (``speculate_tokens``). Each
step the MTP block drafts the token after the next from the main model's last streams, and the
main model takes the next token and the draft in one two-token step, which verifies the draft
(``v4jax.sampling.speculative_accept``: the kept tokens are distributed exactly as plain sampling's;
greedy output is plain greedy's) and gives the token after it when the draft is kept: one or two
tokens a step. A rejected draft is rolled back by moving the row's position back one: everything
it wrote lies at or past the position (the window slot and the compressors' ring slots it
overwrote hold positions no later query or block reads, and an entry of a block it closed is
rewritten before it is read again). The MTP block keeps its own cache of the accepted tokens.

A row stops at one of its ``stop_tokens`` (not included in its result) or after ``max_new_tokens``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.multihost_utils import process_allgather

from v4jax.chat import EOS_ID  # the DeepSeek-V4 tokenizer's end of sentence: the default stop token
from v4jax.config import ModelConfig
from v4jax.decode import (
    cache_shardings,
    extend,
    extend_with_mtp,
    init_cache,
    last_index,
    logits_at,
    mtp_chunk,
    run_chunk,
)
from v4jax.sampling import (
    SamplingParams,
    row_keys,
    sample,
    sample_with_keys,
    sample_with_log_probs,
    sampling_params,
    speculative_accept,
)
from v4jax.scan import unstack_layers

SPECULATIVE = (None, "mtp")


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


def _to_host(x) -> np.ndarray:
    """A device array's value on this host. On a mesh over several processes (a multi-host job) the
    rows are split over hosts, and every process gathers them (a collective: each one reads the same
    values in the same order, as the loop runs the same on all)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(process_allgather(x, tiled=True))
    return np.asarray(x)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@functools.partial(jax.jit, static_argnames=("config", "dtype", "chunk", "all_greedy"), donate_argnames=("cache",))
def decode_tokens(params, cache, logits, sampling: SamplingParams, step, active, limit, stops,
                  config: ModelConfig, dtype, chunk: int, all_greedy: bool | None = None):
    """Up to ``min(chunk, limit)`` decode steps in one ``jax.lax.while_loop``, ending early when no
    row is active. Step i samples a token per row from ``logits`` [b, V] with the key of step
    ``step + i``; a row whose token is in ``stops`` [S] stops (the token is neither kept nor
    appended); the others' tokens are appended to the cache (donated). ``all_greedy`` (static):
    whether every row's temperature is 0, as ``generate`` knows it; True or False, a step holds no
    conditional (``v4jax.sampling._sample``).

    -> (tokens [b, chunk] int32, -1 where a row kept none; their log-probabilities under the
    distribution they were drawn from [b, chunk] f32 (``v4jax.sampling.log_probs``; 0 for greedy
    rows); the steps run; the logits after the last appended tokens; the cache; active [b])."""
    if "stages" in params:
        params = unstack_layers(params, config)
    b = logits.shape[0]

    def cond(carry):
        i, _, _, _, _, active = carry
        return (i < jnp.minimum(limit, chunk)) & active.any()

    def body(carry):
        i, out, out_logp, logits, cache, active = carry
        tokens, logp = sample_with_log_probs(logits, sampling, step + i, all_greedy=all_greedy)
        active = active & ~jnp.isin(tokens, stops)
        out = out.at[:, i].set(jnp.where(active, tokens, -1))
        out_logp = out_logp.at[:, i].set(jnp.where(active, logp, 0.0))
        new_logits, cache = extend(params, cache, tokens[:, None], active.astype(jnp.int32), config, dtype)
        return i + 1, out, out_logp, jnp.where(active[:, None], new_logits, logits), cache, active

    init = (jnp.int32(0), jnp.full((b, chunk), -1, jnp.int32), jnp.zeros((b, chunk), jnp.float32), logits, cache,
            active)
    i, out, out_logp, logits, cache, active = jax.lax.while_loop(cond, body, init)
    return out, out_logp, i, logits, cache, active


@functools.partial(jax.jit, static_argnames=("config", "dtype", "chunk", "all_greedy"), donate_argnames=("cache",))
def speculate_tokens(params, cache, state: dict, sampling: SamplingParams, max_new, stops,
                     config: ModelConfig, dtype, chunk: int, all_greedy: bool | None = None):
    """Up to ``chunk`` self-speculative steps (module docstring) in one ``jax.lax.while_loop``, ending
    early when no row is active; each keeps one or two tokens per active row. A row stops at a token
    in ``stops`` [S] (not kept) or when it has kept ``max_new`` tokens.

    ``state`` (``start_speculation`` makes the first): ``pending`` [b], the last token chosen (kept,
    not yet in the main cache); ``mtp_x`` [b, 2, n, d] and ``mtp_next`` [b, 2], the MTP block's
    positions not yet run (the main streams at p and token p + 1), the first ``mtp_n`` [b] of them;
    ``count`` [b], tokens kept so far; ``active`` [b]; ``drafted``, ``accepted``: drafts made and
    kept, over all rows.

    ``all_greedy`` as in ``decode_tokens``.
    Randomness: a row's step that starts with k kept tokens draws with the key of (seed, row, k),
    folded with 0 (the draft), 1 (the verification, two draws) and 2 (the token after a kept draft).
    -> (tokens [b, 2 chunk] int32, each row's kept tokens first, then -1; how many [b]; the cache;
    the state)."""
    if "stages" in params:
        params = unstack_layers(params, config)
    b = state["pending"].shape[0]
    rows = jnp.arange(b)

    def cond(carry):
        i, _, _, _, st = carry
        return (i < chunk) & st["active"].any()

    def body(carry):
        i, out, n_out, cache, st = carry
        active = st["active"]
        keys = row_keys(sampling.seed, st["count"])
        fold = lambda tag: jax.vmap(jax.random.fold_in, (0, None))(keys, tag)  # noqa: E731

        # draft: the MTP block on its pending positions; its last predicts the token after `pending`
        x_mtp, cache = mtp_chunk(params, cache, st["mtp_x"], st["mtp_next"], jnp.where(active, st["mtp_n"], 0),
                                 config, dtype)
        q_logits = logits_at(params, x_mtp, last_index(st["mtp_n"], 2), config, mtp=True)[:, 0]
        draft = sample_with_keys(q_logits, sampling, fold(0), all_greedy)

        # verify: the main model on [pending, draft]
        pos = cache["pos"]
        x, cache = run_chunk(params, cache, jnp.stack([st["pending"], draft], 1), 2 * active.astype(jnp.int32),
                             config, dtype)
        logits = logits_at(params, x, jnp.broadcast_to(jnp.arange(2), (b, 2)), config)
        kept, token = speculative_accept(logits[:, 0], q_logits, draft, sampling, fold(1), all_greedy)
        after = sample_with_keys(logits[:, 1], sampling, fold(2), all_greedy)
        cache = {**cache, "pos": pos + jnp.where(active, 1 + kept, 0)}  # a rejected draft rolled back

        # keep `token`, then `after` where the draft was kept, each until a stop token or max_new
        first_ok = active & ~jnp.isin(token, stops)  # (an active row has kept fewer than max_new)
        second_ok = first_ok & kept & ~jnp.isin(after, stops) & (st["count"] + 1 < max_new)
        n_new = first_ok.astype(jnp.int32) + second_ok.astype(jnp.int32)
        out = out.at[rows, jnp.where(first_ok, n_out, 2 * chunk)].set(token, mode="drop")
        out = out.at[rows, jnp.where(second_ok, n_out + 1, 2 * chunk)].set(after, mode="drop")
        count = st["count"] + n_new
        new = dict(
            pending=jnp.where(kept, after, token),
            mtp_x=x.astype(st["mtp_x"].dtype),  # a rejected draft's row runs only position 0 (mtp_n 1)
            mtp_next=jnp.stack([token, after], 1),
            mtp_n=jnp.where(kept, 2, 1).astype(jnp.int32),
            count=count,
            active=active & (first_ok & (second_ok | ~kept)) & (count < max_new),
            drafted=st["drafted"] + active.sum(),
            accepted=st["accepted"] + (active & kept).sum())
        return i + 1, out, n_out + n_new, cache, new

    init = (jnp.int32(0), jnp.full((b, 2 * chunk), -1, jnp.int32), jnp.zeros((b,), jnp.int32), cache, state)
    _, out, n_out, cache, state = jax.lax.while_loop(cond, body, init)
    return out, n_out, cache, state


def generate(params, config: ModelConfig, prompts, max_new_tokens: int, *, temperature=1.0, top_p=1.0, top_k=0,
             seed=0, stop_tokens: Sequence[int] | None = None, dtype=jnp.bfloat16, prefill_chunk: int = 2048,
             on_tokens: Callable[[list[int | None]], None] | None = None, mesh=None,
             fp8_cache: bool = False, stream_every: int = 16, speculative: str | None = None,
             stats: dict | None = None, log_probs: list | None = None) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids): a list of token lists.

    ``temperature`` (0: greedy), ``top_p``, ``top_k`` (0: off) and ``seed``: a value for every row
    or a list of one per row. ``stop_tokens``: the ids that end a row (default: EOS, id 1; ``[]``
    for none). ``on_tokens(tokens)``, if given, is called for each generated position with each
    row's new token (None for a row that has none there): for streaming; the calls come in bursts,
    each time the device returns (every ``stream_every`` steps). ``mesh``: the mesh ``params`` are
    sharded on; the cache is then split by rows (``v4jax.decode.cache_shardings``). ``fp8_cache``:
    the compressed entries' non-RoPE channels kept in FP8 (``v4jax.decode.init_cache``).
    ``speculative="mtp"``: draft with the MTP block (module docstring); then ``stats``, if given a
    dict, receives ``drafted``, ``accepted`` and ``acceptance_rate``. ``log_probs``, if given a list,
    receives one list per row: each new token's log-probability under the distribution it was drawn
    from (after temperature, top-k and top-p; 0 for greedy rows), as GRPO's old policy needs.
    """
    prompts = _check_prompts(prompts, config.vocab_size)
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("prefill_chunk", prefill_chunk)
    _positive_int("stream_every", stream_every)
    if speculative not in SPECULATIVE:
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative is not None and log_probs is not None:
        raise ValueError("log_probs come from plain decoding: leave speculative unset to record them")
    if speculative == "mtp" and "mtp" not in params:
        raise ValueError("speculative='mtp' needs the model's MTP block, and this checkpoint has none "
                         "(num_nextn_predict_layers = 0, or its mtp.* tensors were not loaded): generate without it")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} passes the "
                         f"model's max_position_embeddings={config.max_position_embeddings}: shorten one of them")
    stops = jnp.asarray([EOS_ID] if stop_tokens is None else list(stop_tokens), jnp.int32)
    b = len(prompts)
    sp = sampling_params(b, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    lengths = np.array([len(p) for p in prompts])
    # +1: the last token sampled is appended too (it is never read); speculative: the draft after it
    cache = init_cache(config, b, _capacity(int(lengths.max()) + max_new_tokens + 1), dtype, fp8_cache,
                       mtp=speculative == "mtp")
    if mesh is not None:
        cache = jax.device_put(cache, cache_shardings(cache, mesh))
    logits, x_last, cache = prefill(params, cache, prompts, lengths, prefill_chunk, config, dtype,
                                     speculative == "mtp")

    out: list[list[int]] = [[] for _ in range(b)]
    all_greedy = bool((np.asarray(sp.temperature) <= 0).all())  # the sampler's branch, known here

    def stream(tokens: np.ndarray, counts: np.ndarray) -> None:
        """Each row's first counts[row] tokens [b, ...] into ``out``, and to on_tokens by position."""
        for j in range(int(counts.max(initial=0))):
            shown = [int(tokens[r, j]) if j < counts[r] else None for r in range(b)]
            for r, t in enumerate(shown):
                if t is not None:
                    out[r].append(t)
            if on_tokens is not None:
                on_tokens(shown)

    if speculative is None:
        active, step = jnp.ones((b,), bool), 0
        if log_probs is not None:
            log_probs[:] = [[] for _ in range(b)]
        while step < max_new_tokens:
            tokens, logp, n, logits, cache, active = decode_tokens(
                params, cache, logits, sp, jnp.int32(step), active, jnp.int32(max_new_tokens - step), stops, config,
                dtype, stream_every, all_greedy)
            n = int(_to_host(n))
            tokens, logp = _to_host(tokens)[:, :n], _to_host(logp)[:, :n]
            stream(tokens, (tokens >= 0).sum(1))
            if log_probs is not None:
                for r in range(b):
                    log_probs[r] += [float(x) for x in logp[r][tokens[r] >= 0]]
            step += n
            if not bool(_to_host(active).any()):
                break
        return out

    first, state = start_speculation(logits, x_last, sp, stops, jnp.int32(max_new_tokens))
    stream(_to_host(first)[:, None], _to_host(state["count"]))
    while bool(_to_host(state["active"]).any()):
        tokens, n, cache, state = speculate_tokens(params, cache, state, sp, jnp.int32(max_new_tokens), stops,
                                                   config, dtype, stream_every, all_greedy)
        stream(_to_host(tokens), _to_host(n))
    if stats is not None:
        drafted, accepted = int(_to_host(state["drafted"])), int(_to_host(state["accepted"]))
        stats.update(drafted=drafted, accepted=accepted, acceptance_rate=accepted / max(drafted, 1))
    return out


@jax.jit
def start_speculation(logits, x_last, sampling: SamplingParams, stops, max_new):
    """The first new token from the prefill's logits (plain sampling's step 0) and the state
    ``speculate_tokens`` starts from: its MTP position is the prompt's last (x_last [b, n, d], the
    final streams there) with that token. -> (tokens [b], the state)."""
    first = sample(logits, sampling, jnp.int32(0))
    kept = ~jnp.isin(first, stops)
    x = jnp.repeat(x_last[:, None], 2, axis=1)
    state = dict(pending=first, mtp_x=x, mtp_next=jnp.stack([first, first], 1),
                 mtp_n=jnp.ones(first.shape, jnp.int32), count=kept.astype(jnp.int32),
                 active=kept & (max_new > 1), drafted=jnp.int32(0), accepted=jnp.int32(0))
    return first, state


def prefill(params, cache, prompts, lengths, chunk_len: int, config: ModelConfig, dtype, mtp: bool):
    """The prompts through the cache in chunks -> (logits [b, V] after each prompt, the final streams
    at each prompt's last token [b, n, d] (with ``mtp``, else None), the cache). With ``mtp`` the MTP
    block also takes every prompt position but the last (whose next token is not chosen yet)."""
    b = len(prompts)
    logits = x_last = None
    for start in range(0, int(lengths.max()), chunk_len):
        n_valid = np.clip(lengths - start, 0, chunk_len)
        width = _bucket(int(n_valid.max()))
        chunk = np.zeros((b, width), np.int32)
        following = np.zeros((b, width), np.int32)  # the token after each position, where the prompt has one
        for i, p in enumerate(prompts):
            chunk[i, :n_valid[i]] = p[start:start + n_valid[i]]
            nxt = p[start + 1:start + n_valid[i] + 1]
            following[i, :len(nxt)] = nxt
        ended_here = jnp.asarray(n_valid > 0)  # a row's last prompt token was in this chunk
        if mtp:
            mtp_valid = np.clip(lengths - 1 - start, 0, n_valid)
            lg, xl, cache = extend_with_mtp(params, cache, jnp.asarray(chunk), jnp.asarray(n_valid, jnp.int32),
                                            jnp.asarray(following), jnp.asarray(mtp_valid, jnp.int32), config, dtype)
            x_last = xl if x_last is None else jnp.where(ended_here[:, None, None], xl, x_last)
        else:
            lg, cache = extend(params, cache, jnp.asarray(chunk), jnp.asarray(n_valid, jnp.int32), config, dtype)
        logits = lg if logits is None else jnp.where(ended_here[:, None], lg, logits)
    return logits, x_last, cache
