"""Inference: V4's decode state (the cache) and ``extend``, which is prefill, chunked prefill and
decode in one function (spec §2.12; the official ``inference/model.py`` keeps the same state).

Shape letters: b rows, t new tokens of a call, d model, n mHC streams, c head dim, c_I indexer head
dim, W window, m a layer's compression ratio, N = max_len // m entry slots, V vocabulary.

**The cache** is a pytree (``init_cache``)::

    pos       int32 [b]           tokens each row holds (= the next token's position)
    layers[i] window   [b, W, c]      K=V of the last W positions, position p in slot p % W
              kv_K, gate_K            compressed layers, for each compressor K (entries; CSA: and
                       [b, R, k c]    index): its fp32 projections (``attention.compressor_rows``)
                                      of the last R positions, slot p % R: R = m (HCA: the partial
                                      block) or 2m (CSA: and the block before it, k = 2 channel sets)
              entries  [b, N, c]      compressed layers: block i's entry in slot i; with an
                                      FP8 cache a dict: nope [b, N, c - r] E4M3 codes of the
                                      non-RoPE channels, scale [b, N, (c - r) / 64] their E8M0
                                      scales (1 x 64 blocks, spec §2.11), rope [b, N, r]
              index    [b, N, c_I]    CSA layers: the indexer's entries
    mtp, mtp_pos                      with ``init_cache(..., mtp=True)``: the MTP block's layer
                                      cache (as above) and its positions, for speculative decoding

Rows are independent: each has its own ``pos``, so rows of different lengths share a batch, and
which window keys and entries a query sees follows from positions alone. As in the official code,
the compressors' projections are kept rather than their input: each token is projected once, when
it arrives, where keeping the input (2m rows of d, until 2026-12-07) projected a block's m or 2m
rows again at every decode step (in bench-flash-8l's batch-32 step, three [4096, 2048] x [2048,
1024] products). The rings are fixed-size: the cache grows only through ``entries``/``index``.

**extend(params, cache, tokens [b, t], n_valid [b])** appends each row's first ``n_valid`` tokens
at its position: queries attend to the window ring unrolled in position order followed by the
chunk's own keys, and to the cached entries after the blocks that close inside the chunk have been
pooled (from the rings' projections and the chunk's) and written. A decode step (t = 1) writes the
token into every ring in place, attends to the window ring as it lies (the keys' order does not
change the softmax), and pools the token's block from its m rows (2m with CSA's overlap) of
projections gathered out of the rings; the chunk path would rewrite and unroll every ring at every
step. Prefill is ``extend`` on an empty cache, decode is ``extend`` with t = 1, and a long prompt
can go in several chunks: all give the numbers of ``v4jax.model.forward`` on the whole sequence
(tests/test_decode.py).
Padding tokens (t >= n_valid) change nothing. The MoE runs the local dropless path
(``jax.lax.ragged_dot``; on a mesh XLA partitions it); Engram layers are not supported yet. On a
mesh the cache is split by rows (``cache_shardings``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from v4jax import devices
from v4jax.attention import compressor_rows, indexer_queries, indexer_topk, output_projection, pool_rows, project
from v4jax.config import CSA, SWA, ModelConfig
from v4jax.index_list import QUERY_CHUNK, Entries, attend, from_chunks, pad_tokens
from v4jax.layers import apply_rope, linear_f32, rope_angles, rope_frequencies
from v4jax.mhc import kernel_runs
from v4jax.model import block, final_hidden, mtp_input
from v4jax.parallel import DEFAULT_RULES, batch_sharding
from v4jax.quant import decode_rows, encode_rows
from v4jax.scan import unstack_layers

# --------------------------------------------------------------------------------------------------
# The cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, fp8_entries: bool = False,
               mtp: bool = False) -> dict:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens: room for the entries of the
    blocks that complete within max_len (``extend`` drops any past it; ``v4jax.generate`` sizes the
    cache for the prompt and the new tokens). ``fp8_entries``: the compressed entries' non-RoPE
    channels in FP8 (E4M3, a power-of-two scale per 64 channels), as the official inference keeps
    them; the window and the indexer's keys stay in ``dtype``, the compressors' projections in fp32.
    ``mtp``: also the MTP block's cache (``mtp`` and its own ``mtp_pos``, see ``mtp_chunk``)."""
    if config.engram is not None:
        raise NotImplementedError("generation with Engram (model.engram) is not supported yet: its short "
                                  "convolution and n-gram ids need a decode state of their own")
    layers = [_layer_cache(config, i, batch, max_len, dtype, fp8_entries) for i in range(config.num_hidden_layers)]
    cache = {"pos": jnp.zeros((batch,), jnp.int32), "layers": layers}
    if mtp:
        if config.num_nextn_predict_layers != 1:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        cache["mtp"] = _layer_cache(config, config.num_hidden_layers, batch, max_len, dtype, fp8_entries)
        cache["mtp_pos"] = jnp.zeros((batch,), jnp.int32)
    return cache


def _layer_cache(config: ModelConfig, layer: int, b: int, max_len: int, dtype, fp8_entries: bool) -> dict:
    """One layer's cache (layer L: the MTP block's): the window ring, and for compressed layers the
    entries (CSA: and the indexer's) and each compressor's rings of projected rows."""
    c, w = config.head_dim, config.sliding_window
    kind, m = config.layer_type(layer), config.layer_ratio(layer)
    lc = {"window": jnp.zeros((b, w, c), dtype)}
    if kind != SWA:
        lc["entries"] = _empty_entries(b, max_len // m, c, config.qk_rope_head_dim, dtype, fp8_entries)
    if kind == CSA:
        lc["index"] = jnp.zeros((b, max_len // m, config.index_head_dim), dtype)
    for key, width, overlap in _compressors(config, layer):
        rows = (2 if overlap else 1) * m  # the partial block, and for CSA's overlap the block before it
        lc["kv_" + key] = jnp.zeros((b, rows, (2 if overlap else 1) * width), jnp.float32)
        lc["gate_" + key] = jnp.zeros((b, rows, (2 if overlap else 1) * width), jnp.float32)
    return lc


def _compressors(config: ModelConfig, layer: int) -> list[tuple[str, int, bool]]:
    """A layer's compressors: (the cache key of their entries, the entry width c, overlapping blocks):
    HCA's, or CSA's own and its indexer's."""
    kind = config.layer_type(layer)
    if kind == SWA:
        return []
    main = [("entries", config.head_dim, kind == CSA)]
    return main + [("index", config.index_head_dim, True)] if kind == CSA else main


FP8_ENTRY_BLOCK = 64  # channels per scale of an FP8 cache's entries (spec §2.11)


def _empty_entries(b: int, n: int, c: int, r: int, dtype, fp8: bool):
    if not fp8:
        return jnp.zeros((b, n, c), dtype)
    return {"nope": jnp.zeros((b, n, c - r), jnp.float8_e4m3fn),
            "scale": jnp.ones((b, n, -(-(c - r) // FP8_ENTRY_BLOCK)), jnp.float8_e8m0fnu),
            "rope": jnp.zeros((b, n, r), dtype)}


def _write_entries(cached, slot: jax.Array, keys: jax.Array):
    """keys [b, J, c] into the entries' slots [b, J] (a slot past the end drops its key); an FP8
    cache stores the non-RoPE channels as codes and scales."""
    def put(buf, rows):
        return jax.vmap(lambda c, s, k: c.at[s].set(k.astype(c.dtype), mode="drop"))(buf, slot, rows)

    if not isinstance(cached, dict):
        return put(cached, keys)
    r = cached["rope"].shape[-1]
    codes, scales = encode_rows(keys[..., :-r], FP8_ENTRY_BLOCK)
    return {"nope": put(cached["nope"], codes), "scale": put(cached["scale"], scales),
            "rope": put(cached["rope"], keys[..., -r:])}


def _entry_values(cached, dtype) -> jax.Array:
    """The entries [b, N, c] in ``dtype`` (an FP8 cache's decoded)."""
    if not isinstance(cached, dict):
        return cached.astype(dtype)
    nope = decode_rows(cached["nope"], cached["scale"], FP8_ENTRY_BLOCK)
    return jnp.concatenate([nope.astype(dtype), cached["rope"].astype(dtype)], axis=-1)


def cache_shardings(cache: dict, mesh: jax.sharding.Mesh) -> dict:
    """Each cache leaf split over the mesh's batch axes on its row axis (replicated when the rows
    do not divide): rows are independent, so decode needs no communication for the cache. The
    single K=V head is not split over ``tensor`` (as MLA latent caches are not)."""
    return jax.tree.map(lambda a: batch_sharding(mesh, ndim=a.ndim) if a.shape[0] % _batch_ways(mesh) == 0
                        else NamedSharding(mesh, PartitionSpec()), cache)


def _batch_ways(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in DEFAULT_RULES["batch"] if a in mesh.shape]))


def cache_bytes(config: ModelConfig, tokens: int, batch: int = 1, dtype=jnp.bfloat16,
                fp8_entries: bool = False) -> dict[str, int]:
    """Bytes of the cache for ``batch`` rows of ``tokens`` tokens, computed from its shapes (nothing is
    allocated): ``total``, ``growing`` (the entries: what grows with the context) and ``fixed``."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, tokens, dtype, fp8_entries))
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    total = size(shapes)
    growing = sum(size(lc[k]) for lc in shapes["layers"] for k in ("entries", "index") if k in lc)
    return {"total": total, "growing": growing, "fixed": total - growing}


def _ring_positions(r: int, end: jax.Array) -> jax.Array:
    """The position each slot of a ring of ``r`` slots holds once positions < end [b] are written:
    slot j holds the latest position < end that is j mod r -> [b, r] (negative: none yet)."""
    return end[:, None] - 1 - ((end[:, None] - 1 - jnp.arange(r)) % r)


def _ring_update(ring: jax.Array, rows: jax.Array, pos: jax.Array, end: jax.Array) -> jax.Array:
    """The ring [b, R, ...] (position p in slot p % R) after positions pos..end-1 (``rows`` [b, t, ...],
    row j at position pos + j) were appended. Rewrites the whole ring: for a chunk of tokens."""
    t = rows.shape[1]
    latest = _ring_positions(ring.shape[1], end)
    new = jnp.take_along_axis(rows, jnp.clip(latest - pos[:, None], 0, t - 1)[..., None], axis=1)
    return jnp.where((latest >= pos[:, None])[..., None], new, ring)


def _ring_write(ring: jax.Array, row: jax.Array, pos: jax.Array, n_valid: jax.Array) -> jax.Array:
    """The ring [b, R, ...] after one token a row (``row`` [b, 1, ...] at position ``pos``, where
    n_valid [b] is 1): a write of one slot a row, in place (decode), where ``_ring_update``
    rewrites the ring."""
    b, r = ring.shape[:2]
    rows, slot = jnp.arange(b), pos % r
    keep = (n_valid > 0).reshape((b,) + (1,) * (ring.ndim - 2))
    return ring.at[rows, slot].set(jnp.where(keep, row[:, 0].astype(ring.dtype), ring[rows, slot]))


def _unroll(ring: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ring's R slots in position order: positions pos-R..pos-1 -> (values [b, R, ...], positions [b, R])."""
    r = ring.shape[1]
    at = pos[:, None] - r + jnp.arange(r)
    return jnp.take_along_axis(ring, (at % r)[..., None], axis=1), at


# --------------------------------------------------------------------------------------------------
# One layer's attention on a chunk


def _new_entries(ext, ext_first, p, pos, end, m: int, overlap: bool, freqs, eps, cached, dtype):
    """Pool the blocks that close in [pos, end) from the compressor's projected rows ext = (kv, gate)
    [b, R + t, k*c] (the ring's R rows, then the chunk's; row r at position ext_first + r) and write
    them into ``cached`` [b, N, c] at their block index."""
    t = ext[0].shape[1] - (2 if overlap else 1) * m
    blk = pos[:, None] // m + jnp.arange(t // m + 1)  # [b, J] the blocks that can close in the chunk
    closes = (blk + 1) * m <= end[:, None]
    return _pool_blocks(ext, blk * m - ext_first[:, None], blk, closes, p, m, overlap, freqs, eps, cached, dtype)


def _close_block(rings, p, pos, end, m: int, overlap: bool, freqs, eps, cached, dtype):
    """Decode (one token a row): pool the block that the new token closes from the compressor's
    rings of projected rows (kv, gate) [b, R, k*c] (after ``_ring_write``: R = m rows, the block, or
    2m with CSA's overlap, the block and the one before it) and write its entry into ``cached``
    [b, N, c] in place; rows that close no block write nothing. Nothing is projected here: the
    rings hold each token's projections, made when it arrived. It is computed at every step:
    skipping the steps that close no block with a ``jax.lax.cond`` would make XLA on a GPU copy the
    predicate to the host and wait for it (outside a command buffer), once per compressor and step."""
    blk = (pos // m)[:, None]
    closes = (blk + 1) * m <= end[:, None]
    slots = (blk * m + jnp.arange(-m if overlap else 0, m)) % rings[0].shape[1]  # [the block before,] the block
    rows = tuple(jnp.take_along_axis(r, slots[..., None], axis=1) for r in rings)
    start = jnp.full(blk.shape, m if overlap else 0, jnp.int32)
    return _pool_blocks(rows, start, blk, closes, p, m, overlap, freqs, eps, cached, dtype)


def _pool_blocks(rows, start, blk, closes, p, m: int, overlap: bool, freqs, eps, cached, dtype):
    """The entries of blocks ``blk`` [b, J] (their first of the projected rows (kv, gate) [b, s, k*c]
    at ``start`` [b, J]), pooled by the compressor p and RoPE'd at each block's first position; those
    that ``closes`` [b, J] written into ``cached`` [b, N, c] at their block index, the others dropped."""
    keys = pool_rows(*rows, p, start, blk == 0, m, overlap, eps, dtype)
    keys = apply_rope(keys, *rope_angles(freqs, blk * m))
    n = jax.tree.leaves(cached)[0].shape[1]
    return _write_entries(cached, jnp.where(closes, blk, n), keys)  # slot n: past the end, dropped


def _cached_entries(keys, m: int, pos, end) -> Entries:
    """The cache's entries as ``Entries`` seen by the chunk's queries (one document, segment 1; row
    index = position - pos)."""
    b, n = keys.shape[:2]
    last = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) * m + (m - 1), (b, n))
    return Entries(keys, jnp.ones((b, n), jnp.int32), last, last - pos[:, None], last < end[:, None])


def _window_attention(q, keys, key_pos, key_ok, positions, sink, window: int, entries=None, idx=None,
                      query_chunk: int = QUERY_CHUNK):
    """``attend`` for chunk queries q [b, t, h, c] at ``positions`` [b, t] over keys [b, W + t, c]
    (the unrolled ring, then the chunk; ``key_pos``, ``key_ok`` [b, W + t]) and the cached entries,
    in blocks of ``query_chunk`` queries, each seeing its W + block keys."""
    t = q.shape[1]
    qb = min(query_chunk, t)
    n = -(-t // qb)
    size, span = n * qb, window + qb
    q, positions = pad_tokens(q, size, 0), pad_tokens(positions, size, 0)
    keys, key_pos = pad_tokens(keys, window + size, 0), pad_tokens(key_pos, window + size, 0)
    key_ok = pad_tokens(key_ok, window + size, False)
    idx = None if idx is None else pad_tokens(idx, size, -1)

    def one(u):
        qs = jax.lax.dynamic_slice_in_dim(q, u * qb, qb, 1)
        ps = jax.lax.dynamic_slice_in_dim(positions, u * qb, qb, 1)
        ks, kp, ko = (jax.lax.dynamic_slice_in_dim(a, u * qb, span, 1) for a in (keys, key_pos, key_ok))
        ib = None if idx is None else jax.lax.dynamic_slice_in_dim(idx, u * qb, qb, 1)
        return _attend_block(qs, ps, ks, kp, ko, sink, window, entries, ib)

    return from_chunks(jax.lax.map(one, jnp.arange(n)), t)  # [n, b, qb, h, c] -> [b, t, h, c]


def _attend_block(q, positions, keys, key_pos, key_ok, sink, window: int, entries, idx):
    """``attend`` for queries q [b, q, h, c] at ``positions`` over window keys [b, j, c] at
    ``key_pos`` (``key_ok``) [b, j], each seeing those of the last ``window`` positions, and the
    entries: all visible ones (HCA) or those of ``idx`` [b, q, k] (CSA)."""
    dist = positions[:, :, None] - key_pos[:, None, :]
    ok = (dist >= 0) & (dist < window) & key_ok[:, None, :]
    if entries is None:
        return attend(q, keys, ok, sink)[0]
    if idx is None:
        return attend(q, keys, ok, sink, entries.keys, None, entries.visible(jnp.ones_like(positions), positions))[0]
    return attend(q, keys, ok, sink, entries.keys, idx, idx >= 0)[0]


def attention_extend(x, p, lc: dict, config: ModelConfig, layer: int, pos, n_valid, query_chunk=QUERY_CHUNK):
    """One layer's attention for the chunk x [b, t, d] (the attn_norm output) appended at ``pos`` [b]
    (``n_valid`` [b] real tokens per row) -> (out [b, t, d], the layer's new cache)."""
    b, t, _ = x.shape
    eps, w = config.rms_norm_eps, config.sliding_window
    kind, m = config.layer_type(layer), config.layer_ratio(layer)
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)
    end = pos + n_valid
    freqs = rope_frequencies(config, layer)
    angles = rope_angles(freqs, positions)
    cq, q, kv = project(x, p, config, angles)

    decode = t == 1  # one token a row: the rings are written in place and read in slot order
    if decode:
        new = {"window": _ring_write(lc["window"], kv, pos, n_valid)}
        keys = new["window"]  # slot order: attention does not depend on the keys' order
        key_pos = _ring_positions(w, end)
        key_ok = key_pos >= 0
    else:  # a chunk: the window ring unrolled in position order, then the chunk's keys
        ring, ring_pos = _unroll(lc["window"], pos)
        keys = jnp.concatenate([ring, kv.astype(ring.dtype)], axis=1)
        key_pos = jnp.concatenate([ring_pos, positions], axis=1)
        key_ok = jnp.concatenate([ring_pos >= 0, jnp.arange(t)[None, :] < n_valid[:, None]], axis=1)
        new = {"window": _ring_update(lc["window"], kv.astype(ring.dtype), pos, end)}

    entries = idx = None
    for key, _, overlap in _compressors(config, layer):
        cp = p["compressor"] if key == "entries" else p["indexer"]["compressor"]
        rows = compressor_rows(x, cp)  # the chunk's tokens' projections [b, t, k*c], each kept in a ring
        names = ("kv_" + key, "gate_" + key)
        if decode:
            new.update({k: _ring_write(lc[k], r, pos, n_valid) for k, r in zip(names, rows)})
            new[key] = _close_block(tuple(new[k] for k in names), cp, pos, end, m, overlap, freqs, eps, lc[key],
                                    x.dtype)
        else:
            rings = [_unroll(lc[k], pos) for k in names]
            ext = tuple(jnp.concatenate([ring, r], axis=1) for (ring, _), r in zip(rings, rows))
            new.update({k: _ring_update(lc[k], r, pos, end) for k, r in zip(names, rows)})
            new[key] = _new_entries(ext, rings[0][1][:, 0], cp, pos, end, m, overlap, freqs, eps, lc[key], x.dtype)
    if kind != SWA:
        entries = _cached_entries(_entry_values(new["entries"], x.dtype), m, pos, end)
        if kind == CSA:
            ip = p["indexer"]
            iq, iw = indexer_queries(x, cq, ip, config, angles)
            idx = indexer_topk(iq, iw, _cached_entries(new["index"].astype(x.dtype), m, pos, end),
                               jnp.ones((b, t), jnp.int32), positions, config.index_topk, query_chunk=query_chunk)

    sink = p["attn_sink"].astype(jnp.float32)
    if decode:
        o = _attend_block(q, positions, keys.astype(q.dtype), key_pos, key_ok, sink, w, entries, idx)
    else:
        o = _window_attention(q, keys.astype(q.dtype), key_pos, key_ok, positions, sink, w, entries, idx, query_chunk)
    return output_projection(o, p, config, angles), new


# --------------------------------------------------------------------------------------------------
# The model on a chunk


def run_chunk(params, cache: dict, tokens, n_valid, config: ModelConfig, dtype, query_chunk: int = QUERY_CHUNK):
    """The main layers on tokens [b, t] appended at ``cache["pos"]`` (each row's first ``n_valid``
    [b]) -> (the final streams [b, t, n, d], before hc_head; the cache with the layers and ``pos``
    advanced). For use inside a jitted function; ``params`` in the layer-list layout."""
    pos = cache["pos"]
    b, t = tokens.shape
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)
    segments = jnp.zeros((b, t), jnp.int32)
    e = params["embed"][tokens].astype(dtype)
    x = jnp.broadcast_to(e[:, :, None, :], e.shape[:2] + (config.hc_mult, e.shape[-1]))
    layers = []
    for i, p in enumerate(params["layers"]):
        x, new = _block_extend(x, p, cache["layers"][i], config, i, positions, segments, tokens, pos, n_valid,
                               query_chunk)
        layers.append(new)
    return x, {**cache, "pos": pos + n_valid, "layers": layers}


def mtp_chunk(params, cache: dict, x_main, next_tokens, n_valid, config: ModelConfig, dtype,
              query_chunk: int = QUERY_CHUNK):
    """The MTP block on t positions appended at ``cache["mtp_pos"]`` (each row's first ``n_valid``):
    position p takes the main streams at p (x_main [b, t, n, d]) and token p + 1 (next_tokens [b, t]),
    as ``v4jax.model.mtp_forward`` -> (its final streams [b, t, n, d], the cache with ``mtp`` and
    ``mtp_pos`` advanced). Its head's logits at p predict token p + 2 (``logits_at(..., mtp=True)``)."""
    pos = cache["mtp_pos"]
    b, t = next_tokens.shape
    p = params["mtp"]
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)
    x = mtp_input(p, params["embed"][next_tokens], x_main, config, dtype)
    x, new = _block_extend(x, p, cache["mtp"], config, config.num_hidden_layers, positions,
                           jnp.zeros((b, t), jnp.int32), next_tokens, pos, n_valid, query_chunk)
    return x, {**cache, "mtp_pos": pos + n_valid, "mtp": new}


def _block_extend(x, p, lc, config, layer, positions, segments, tokens, pos, n_valid, query_chunk):
    """``v4jax.model.block`` with its attention run on the layer's cache -> (x, the layer's new cache)."""
    def attend_chunk(h, p_attn):
        a, new = attention_extend(h, p_attn, lc, config, layer, pos, n_valid, query_chunk)
        return a, {"cache": new}

    kernel = kernel_runs(tokens.size, config.hc_mult, config.hidden_size, devices.current())
    x, info = block(x, p, config, layer, positions, segments, tokens, with_aux=True, attend=attend_chunk,
                    mhc_kernel=kernel)
    return x, info["attn"]["cache"]


def logits_at(params, x, at, config: ModelConfig, mtp: bool = False):
    """fp32 logits [b, k, V] of the streams x [b, t, n, d] at chunk indices ``at`` [b, k]: the main
    head's (hc_head, norm, head), or with ``mtp`` the MTP block's (its hc_head and norm, the shared head)."""
    x = jnp.take_along_axis(x, at[:, :, None, None], axis=1)
    p = params["mtp"] if mtp else params
    return linear_f32(final_hidden(x, p["hc_head"], p["norm"], config), params["head"])


def last_index(n_valid, t: int):
    """Each row's last valid chunk index [b, 1] (0 for a row with none)."""
    return jnp.clip(n_valid - 1, 0, t - 1)[:, None]


@functools.partial(jax.jit, static_argnames=("config", "dtype", "query_chunk"), donate_argnames=("cache",))
def extend(params, cache: dict, tokens, n_valid, config: ModelConfig, dtype=jnp.bfloat16,
           query_chunk: int = QUERY_CHUNK):
    """Append tokens [b, t] (each row's first ``n_valid`` [b]) to the cache (donated).

    Returns (logits [b, V] fp32 at each row's last new token (rows with n_valid 0: meaningless),
    the new cache). ``params`` in either layout (the scan layout is unstacked here).
    """
    if "stages" in params:
        params = unstack_layers(params, config)
    n_valid = jnp.asarray(n_valid, jnp.int32)
    x, cache = run_chunk(params, cache, tokens, n_valid, config, dtype, query_chunk)
    return logits_at(params, x, last_index(n_valid, tokens.shape[1]), config)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "query_chunk"), donate_argnames=("cache",))
def extend_with_mtp(params, cache: dict, tokens, n_valid, next_tokens, mtp_valid, config: ModelConfig,
                    dtype=jnp.bfloat16, query_chunk: int = QUERY_CHUNK):
    """``extend``, then the MTP block on the chunk's first ``mtp_valid`` [b] positions, whose next
    tokens (next_tokens [b, t]) are known: a prompt's chunk, all of whose positions but the prompt's
    last have one. -> (logits [b, V] at each row's last new token, the final streams there
    [b, n, d], the cache)."""
    if "stages" in params:
        params = unstack_layers(params, config)
    n_valid = jnp.asarray(n_valid, jnp.int32)
    x, cache = run_chunk(params, cache, tokens, n_valid, config, dtype, query_chunk)
    _, cache = mtp_chunk(params, cache, x, next_tokens, jnp.asarray(mtp_valid, jnp.int32), config, dtype,
                         query_chunk)
    last = last_index(n_valid, tokens.shape[1])
    x_last = jnp.take_along_axis(x, last[:, :, None, None], axis=1)[:, 0]
    return logits_at(params, x, last, config)[:, 0], x_last, cache
