"""Attention over each query's index list, with the sink: the core that the layer's attention
(``v4jax.attention``), its Pallas kernels (``v4jax.attention_kernel``) and decoding (``v4jax.decode``)
share.

Shape letters: b batch, s tokens, h heads, c head dim, e compressed entries, k slots of a query's
compressed index list, u query blocks, q query within a block, j window key of a block.

Query t attends to one list of keys, and all of them, plus a per-head sink logit with a zero value,
share one softmax; value = key:

    window slots      t-W+1 .. t          (none before the row's start or in another document)
    compressed slots  CSA: the indexer's top-k entries (-1 padded)
                      HCA: every entry, of which t sees those of its document that ended by t

``sparse_attention`` runs that list over blocks of queries (``jax.lax.map``, each block under
``jax.checkpoint``), so no tensor holds both a query axis and a full key or entry axis: memory is
linear in the sequence. Two parts of a list are contiguous and are read as slices rather than
gathered: a block of W queries finds all its window slots among the 2W keys ending at the block, and
"every entry" is the entry array itself under a visibility mask. Only CSA's top-k is gathered. The
arithmetic is that of gathering the list.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from v4jax.layers import F32, einsum_f32

NEG_INF = -jnp.inf

# Default chunk sizes (``v4jax.parallel.ParallelConfig`` sets them per run). They trade memory for
# loop steps and never change a result.
QUERY_CHUNK = 512  # queries per step of the attention and of the indexer
MASK_RATIO = 4  # CSA's listed entries as a mask over all entries while e <= MASK_RATIO * k (see sparse_attention)


class Entries(NamedTuple):
    """A layer's compressed entries and what decides which queries see them (all [b, e] but keys).

    Query t sees entry i iff ``valid[i]``, ``seg[i] == seg(t)`` and ``last[i] <= position(t)``: the
    whole block (and for CSA the block before it) is at or before t, in t's document.
    """

    keys: jax.Array  # [b, e, c] pooled, normalised, RoPE at the block's first position
    seg: jax.Array  # document id of the block
    last: jax.Array  # document position of the block's last token
    last_row: jax.Array  # row index of the block's last token (bounds the indexer's scan)
    valid: jax.Array  # a complete block (slots past the row's count of blocks are not)

    def visible(self, seg: jax.Array, pos: jax.Array) -> jax.Array:
        """Which entries queries with segment ids and positions [b, q] see: [b, q, e] bool."""
        return (self.valid[:, None, :] & (self.seg[:, None, :] == seg[:, :, None])
                & (self.last[:, None, :] <= pos[:, :, None]))


# --------------------------------------------------------------------------------------------------
# Chunks of the token axis, and products with listed entries


def pad_tokens(a: jax.Array, size: int, fill) -> jax.Array:
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, size - a.shape[1])
    return jnp.pad(a, pad, constant_values=fill)


def to_chunks(a: jax.Array, n: int) -> jax.Array:
    """[b, n*q, ...] -> [n, b, q, ...]: the leading axis is what ``jax.lax.map`` steps over."""
    return jnp.moveaxis(a.reshape((a.shape[0], n, -1) + a.shape[2:]), 1, 0)


def from_chunks(a: jax.Array, s: int) -> jax.Array:
    """[n, b, q, ...] -> [b, n*q, ...][:, :s]."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape((a.shape[0], -1) + a.shape[3:])[:, :s]


def _take(keys: jax.Array, idx: jax.Array) -> jax.Array:
    """keys [b, e, c], idx [b, q, k] (-1 = empty, read as entry 0) -> the listed entries [b, q, k, c]."""
    return jax.vmap(lambda kb, i: kb[i])(keys, jnp.maximum(idx, 0))


def _spread(v: jax.Array, idx: jax.Array, e: int) -> jax.Array:
    """v [b, q, h, k] -> [b, q, h, e] with v[..., j] at entry idx[..., j] (the transpose of _take)."""
    put = jax.vmap(jax.vmap(lambda vq, iq: jnp.zeros(vq.shape[:-1] + (e,), vq.dtype).at[:, iq].add(vq)))
    return put(v, jnp.maximum(idx, 0))


def _into_entries(v: jax.Array, other: jax.Array, idx: jax.Array, e: int) -> jax.Array:
    """sum over queries, heads and slots of v [b, q, h, k] * other [b, q, h, c], each slot into its
    entry idx [b, q, k]: -> [b, e, c] fp32. v and other in the matmul dtype.

    Two forms, whichever holds fewer numbers: v spread as scalars into [b, q, h, e] (no colliding
    updates: a query lists an entry once) and one matmul; or the per-slot rows [b, q, k, c] summed
    into their entries. The first is the fast one on GPUs (XLA:GPU serialises colliding row
    updates: 3.2 s of a 4 s small.yaml step on an H200 when every gather's gradient was a
    scatter-add), but grows with the sequence's entry count e: past h e = k c (V4-Flash: e > 4096,
    16K tokens) the second keeps a block's memory independent of the sequence length.
    """
    h, k, c = v.shape[2], v.shape[3], other.shape[3]
    if h * e <= k * c:
        return jnp.einsum("bqhe,bqhc->bec", _spread(v, idx, e), other, preferred_element_type=F32)
    rows = jnp.einsum("bqhk,bqhc->bqkc", v, other, preferred_element_type=F32)
    into = lambda r, i: jax.ops.segment_sum(r.reshape(-1, c), i.reshape(-1), e)  # noqa: E731
    return jax.vmap(into)(rows, jnp.maximum(idx, 0))


# Attention over listed entries, with hand-written backward passes (autodiff of the gather would
# always scatter-add [b, q, k, c] rows into the entries; see _into_entries). Empty slots (-1) carry
# zero cotangent: their logits are masked to -inf and their probabilities 0.


@jax.custom_vjp
def listed_dot(q, keys, idx):
    """q [b, q, h, c] . keys[idx] -> [b, q, h, k] fp32."""
    return jnp.einsum("bqhc,bqkc->bqhk", q, _take(keys, idx), preferred_element_type=F32)


def _listed_dot_fwd(q, keys, idx):
    return listed_dot(q, keys, idx), (q, keys, idx)


def _listed_dot_bwd(res, g):
    q, keys, idx = res
    dq = jnp.einsum("bqhk,bqkc->bqhc", g.astype(q.dtype), _take(keys, idx), preferred_element_type=F32)
    dkeys = _into_entries(g.astype(q.dtype), q, idx, keys.shape[1])
    return dq.astype(q.dtype), dkeys.astype(keys.dtype), None


listed_dot.defvjp(_listed_dot_fwd, _listed_dot_bwd)


@jax.custom_vjp
def listed_combine(p, keys, idx):
    """sum_k p [b, q, h, k] * keys[idx] -> [b, q, h, c] fp32."""
    return jnp.einsum("bqhk,bqkc->bqhc", p, _take(keys, idx), preferred_element_type=F32)


def _listed_combine_fwd(p, keys, idx):
    return listed_combine(p, keys, idx), (p, keys, idx)


def _listed_combine_bwd(res, g):
    p, keys, idx = res
    dp = jnp.einsum("bqhc,bqkc->bqhk", g.astype(p.dtype), _take(keys, idx), preferred_element_type=F32)
    dkeys = _into_entries(p, g.astype(p.dtype), idx, keys.shape[1])
    return dp.astype(p.dtype), dkeys.astype(keys.dtype), None


listed_combine.defvjp(_listed_combine_fwd, _listed_combine_bwd)


# --------------------------------------------------------------------------------------------------
# Core attention over each query's index list, with the sink


def attend(q, keys, ok, sink, entry_keys=None, entry_idx=None, entry_ok=None, with_probs: bool = False):
    """One softmax per query over window keys, compressed entries and the sink; value = key.

    q [b, q, h, c]; keys [b, j, c] with ok [b, q, j] (which keys each query sees); sink [h] fp32.
    Entries: ``entry_keys`` [b, e, c] with either ``entry_idx`` [b, q, k] (the listed ones, -1 =
    empty) and ``entry_ok`` [b, q, k], or ``entry_idx=None`` and ``entry_ok`` [b, q, e] (every entry,
    masked). Returns (out [b, q, h, c] in q's dtype, probs): with ``with_probs`` each entry slot's
    probability summed over heads ([b, q, k] or [b, q, e]), else None.
    """
    scale = q.shape[-1] ** -0.5
    logits = einsum_f32("bqhc,bjc->bqhj", q, keys) * scale
    logits = jnp.where(ok[:, :, None, :], logits, NEG_INF)
    mx = jnp.maximum(jnp.max(logits, axis=-1), sink)  # [b, q, h]
    if entry_keys is not None:
        if entry_idx is not None:
            elog = listed_dot(q, entry_keys, entry_idx) * scale
        else:
            elog = einsum_f32("bqhc,bkc->bqhk", q, entry_keys) * scale
        elog = jnp.where(entry_ok[:, :, None, :], elog, NEG_INF)
        mx = jnp.maximum(mx, jnp.max(elog, axis=-1))
    mx = jax.lax.stop_gradient(mx)
    p_win = jnp.exp(logits - mx[..., None])
    denom = jnp.sum(p_win, axis=-1) + jnp.exp(sink - mx)
    if entry_keys is not None:
        p_ent = jnp.exp(elog - mx[..., None])
        denom = denom + jnp.sum(p_ent, axis=-1)
    inv = (1.0 / denom)[..., None]
    out = einsum_f32("bqhj,bjc->bqhc", (p_win * inv).astype(q.dtype), keys)
    probs = None
    if entry_keys is not None:
        p_out = (p_ent * inv).astype(q.dtype)
        out = out + (listed_combine(p_out, entry_keys, entry_idx) if entry_idx is not None else
                     einsum_f32("bqhk,bkc->bqhc", p_out, entry_keys))
        if with_probs:
            probs = jnp.sum(p_ent * inv, axis=2)
    return out.astype(q.dtype), probs


def sparse_attention(q, kv, sink, segment_ids, positions, window: int, entries: Entries | None = None,
                     entry_idx=None, *, query_chunk: int = QUERY_CHUNK, with_probs: bool = False,
                     mask_ratio: int = MASK_RATIO):
    """One softmax per query over its window slots, its compressed slots and the sink; value = key.

    q [b, s, h, c]; kv [b, s, c] (the window keys); sink [h] (an fp32 logit, not scaled);
    segment_ids, positions [b, s]. ``entries`` (None for SWA) with ``entry_idx`` [b, s, k] int32
    (CSA: the top-k, -1 = empty slot) or ``entry_idx=None`` (every visible entry: HCA, and CSA in
    the dense stage). Window: query t sees row u iff 0 <= t - u < window, in t's document.

    Listed entries are gathered, unless a row has at most ``mask_ratio`` x k entries: then they are
    a mask over all the entries and the products are dense matmuls (at most ``mask_ratio`` times
    the arithmetic, without the gathers of k key rows per query; fewer bytes per query than the
    gathered rows while mask_ratio * h * 4 <= c * 2). 0 always gathers. Either gives the same softmax.

    Returns (out [b, s, h, c] in q's dtype, probs): with ``with_probs`` the attention probability of
    each compressed slot summed over heads, [b, s, k] (or [b, s, e] for every visible entry);
    otherwise None. Runs over ``query_chunk`` queries at a time.
    """
    s = q.shape[1]
    blk = min(window, s)  # queries per block: a block's window slots lie in the 2*blk keys ending at it
    per_step = max(1, min(query_chunk // blk, -(-s // blk)))  # blocks per lax.map step
    n_blk = -(-s // (blk * per_step)) * per_step
    size = n_blk * blk
    has_entries = entries is not None and entries.keys.shape[1] > 0

    cur = to_chunks(pad_tokens(kv, size, 0), n_blk)  # [u, b, q, c]
    cur_seg = to_chunks(pad_tokens(segment_ids, size, -1), n_blk)  # padded keys match no query
    prev = lambda a, fill: jnp.concatenate([jnp.full_like(a[:1], fill), a[:-1]], axis=0)  # noqa: E731
    xs = {"q": to_chunks(pad_tokens(q, size, 0), n_blk),
          "seg": to_chunks(pad_tokens(segment_ids, size, -2), n_blk),  # padded queries match nothing
          "pos": to_chunks(pad_tokens(positions, size, 0), n_blk),
          "keys": jnp.concatenate([prev(cur, 0), cur], axis=2),  # [u, b, j = 2q, c]
          "key_seg": jnp.concatenate([prev(cur_seg, -1), cur_seg], axis=2)}
    if has_entries and entry_idx is not None:
        xs["idx"] = to_chunks(pad_tokens(entry_idx, size, -1), n_blk)
    dist = blk + jnp.arange(blk)[:, None] - jnp.arange(2 * blk)[None, :]  # [q, j] query row - key row
    band = (dist >= 0) & (dist < window)
    sink = sink.astype(F32)

    as_mask = "idx" in xs and entries.keys.shape[1] <= mask_ratio * entry_idx.shape[2]

    def block(xs):
        ok = band & (xs["seg"][:, :, None] == xs["key_seg"][:, None, :])  # [b, q, j]
        if not has_entries:
            return attend(xs["q"], xs["keys"], ok, sink)
        if as_mask:
            idx = xs["idx"]
            out, probs = attend(xs["q"], xs["keys"], ok, sink, entries.keys, None,
                                _listed_mask(idx, entries.keys.shape[1]), with_probs)
            if probs is not None:  # each slot's entry; listed entries are visible, so empty slots get 0
                probs = jnp.where(idx >= 0, jnp.take_along_axis(probs, jnp.maximum(idx, 0), axis=-1), 0.0)
            return out, probs
        if "idx" in xs:
            return attend(xs["q"], xs["keys"], ok, sink, entries.keys, xs["idx"], xs["idx"] >= 0, with_probs)
        return attend(xs["q"], xs["keys"], ok, sink, entries.keys, None, entries.visible(xs["seg"], xs["pos"]),
                      with_probs)

    out, probs = jax.lax.map(jax.checkpoint(block, prevent_cse=False), xs, batch_size=per_step)
    return from_chunks(out, s), (None if probs is None else from_chunks(probs, s))


def _listed_mask(idx: jax.Array, e: int) -> jax.Array:
    """idx [b, q, k] (-1 = empty) -> [b, q, e] bool: which entries the query lists."""
    put = jax.vmap(jax.vmap(lambda i: jnp.zeros((e,), bool).at[i].set(True, mode="drop")))
    return put(jnp.where(idx >= 0, idx, e))
