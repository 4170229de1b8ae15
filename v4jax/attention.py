"""DeepSeek-V4 attention: sliding window + compressed entries (CSA/HCA) + sink, one softmax (spec §2.6).

Shape letters: b batch, s tokens, h heads, c head dim, e compressed entries, k slots of a query's
compressed index list, u query blocks, q query within a block, j window key of a block, g output
groups. m is a layer's compression ratio.

Every layer has the sliding-window branch over one shared K=V head. A compressed layer adds entries
that pool m tokens each (``HCA``: m tokens; ``CSA``: 2m overlapping tokens, then a lightning indexer
picks the top-k entries per query). All keys, plus a per-head sink logit with a zero value, share
one softmax. The output is de-rotated at the query position and projected through g groups.

Every query attends to one index list of keys (its window slots, its compressed slots, the sink);
``v4jax.index_list`` runs it with memory linear in the sequence.

The lightning indexer (``indexer_topk``) likewise scores blocks of queries against blocks of
entries, merging a running top-k, and never holds the [b, s, e] score matrix.

Packed sequences: ``segment_ids`` separate documents and ``positions`` restart at 0 in each one.
Compression runs per document (a block is m consecutive tokens of one document, starting at a
document position divisible by m; a trailing partial block is dropped) and no query sees a key of
another document.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from v4jax import context
from v4jax.attention_kernel import pallas_sparse_attention
from v4jax.config import CSA, SWA, ModelConfig
from v4jax.index_list import (
    MASK_RATIO,
    NEG_INF,
    QUERY_CHUNK,
    Entries,
    from_chunks,
    listed_dot,
    pad_tokens,
    sparse_attention,
    to_chunks,
)
from v4jax.layers import F32, apply_rope, linear, linear_f32, rms_norm, rope_angles, rope_frequencies
from v4jax.params import Init, declare, matrix, pure, vector
from v4jax.quant import indexer_qk, weight_values

KEY_CHUNK = 8192  # entries per step of the indexer's running top-k (``ParallelConfig`` sets it per run)

# --------------------------------------------------------------------------------------------------
# Compressed entries


def compressed_entries(positions: jax.Array, segment_ids: jax.Array, m: int):
    """Where the complete m-token blocks of each document start.

    positions, segment_ids: [b, s]. Returns (start [b, e], valid [b, e]) with e = s // m, the row
    index of each block's first token, in order; entries past the row's count are not valid.
    """
    b, s = positions.shape
    e = s // m
    if e == 0:
        return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
    last = jnp.arange(s) + (m - 1)
    last_c = jnp.minimum(last, s - 1)
    same_doc = (jnp.take_along_axis(segment_ids, jnp.broadcast_to(last_c, (b, s)), axis=1) == segment_ids) & (
        jnp.take_along_axis(positions, jnp.broadcast_to(last_c, (b, s)), axis=1) == positions + (m - 1)
    )
    is_start = (positions % m == 0) & (last < s) & same_doc
    rank = jnp.cumsum(is_start, axis=1) - 1
    slot = jnp.where(is_start, rank, e)  # e: out of range, dropped
    start = jnp.zeros((b, e), jnp.int32)
    start = jax.vmap(lambda st, sl: st.at[sl].set(jnp.arange(s, dtype=jnp.int32), mode="drop"))(start, slot)
    valid = jnp.arange(e)[None, :] < jnp.sum(is_start, axis=1, keepdims=True)
    return start, valid


def compress(x: jax.Array, p: dict, start: jax.Array, first_block: jax.Array, m: int, overlap: bool,
             eps: float) -> jax.Array:
    """Pool m (HCA) or 2m overlapping (CSA) tokens per entry with a learned per-channel softmax.

    x: [b, s, d]; p: {wkv [k*c, d], wgate [k*c, d], ape [m, k*c], norm [c]} with k = 2 if overlap.
    start: [b, e] first token of each entry; first_block: [b, e] the entry is its document's first.
    Returns the normalised entries [b, e, c] in x.dtype (RoPE not yet applied).
    """
    kv, gate = compressor_rows(x, p)
    return pool_rows(kv, gate, p, start, first_block, m, overlap, eps, x.dtype)


def compressor_rows(x: jax.Array, p: dict) -> tuple[jax.Array, jax.Array]:
    """The compressor's per-token projections of x [..., d]: (kv, gate) [..., k*c] in fp32. A token's
    rows do not depend on the others, so a decode cache keeps them (``v4jax.decode``)."""
    return linear_f32(x, p["wkv"]), linear_f32(x, p["wgate"])


def pool_rows(kv: jax.Array, gate: jax.Array, p: dict, start: jax.Array, first_block: jax.Array, m: int,
              overlap: bool, eps: float, dtype) -> jax.Array:
    """``compress`` from the projections kv, gate [b, s, k*c] (``compressor_rows``) -> the entries
    [b, e, c] in ``dtype``."""
    c = p["norm"].shape[0]
    ape = p["ape"].astype(F32)
    cur = start[..., None] + jnp.arange(m)  # [b, e, m] token indices of the block itself

    def gather(t, idx):  # t [b, s, f], idx [b, e, m] -> [b, e, m, f]
        return jax.vmap(lambda tb, ib: tb[ib])(t, jnp.clip(idx, 0, t.shape[1] - 1))

    if overlap:
        # CSA: channels [c:2c] pool the block itself, channels [0:c] the previous block of the same
        # document, giving 2m slots per entry (none from the previous block for a first block).
        prev = cur - m
        vals = jnp.concatenate([gather(kv[..., :c], prev), gather(kv[..., c:], cur)], axis=2)
        prev_logit = gather(gate[..., :c], prev) + ape[:, :c]
        prev_logit = jnp.where(first_block[..., None, None], NEG_INF, prev_logit)
        logits = jnp.concatenate([prev_logit, gather(gate[..., c:], cur) + ape[:, c:]], axis=2)
    else:
        vals = gather(kv, cur)
        logits = gather(gate, cur) + ape
    pooled = jnp.sum(jax.nn.softmax(logits, axis=2) * vals, axis=2)  # [b, e, c] fp32
    return rms_norm(pooled.astype(dtype), p["norm"], eps)


@jax.named_scope("compressor")
def make_entries(x, p, positions, segment_ids, m: int, overlap: bool, freqs, eps: float) -> Entries:
    """The compressed entries of x [b, s, d] with the compressor p, RoPE'd at each block's first position."""
    start, valid = compressed_entries(positions, segment_ids, m)
    block_pos = jnp.take_along_axis(positions, start, axis=1)  # = block index * m
    keys = compress(x, p, start, block_pos == 0, m, overlap, eps)
    keys = apply_rope(keys, *rope_angles(freqs, block_pos))
    return Entries(keys, jnp.take_along_axis(segment_ids, start, axis=1), block_pos + (m - 1), start + (m - 1),
                   valid)


# --------------------------------------------------------------------------------------------------
# Lightning indexer


def _index_scores(w: jax.Array, dots: jax.Array) -> jax.Array:
    """I = sum_h w[h] * relu(dots[h]): w [b, q, h] fp32, dots [b, q, h, k] fp32 -> [b, q, k]."""
    return jnp.einsum("bqh,bqhk->bqk", w, jax.nn.relu(dots))


@jax.named_scope("indexer")
def indexer_inputs(x, cq, p, positions, segment_ids, config: ModelConfig, freqs, m: int):
    """The indexer's queries [b, s, h, c], per-head weights [b, s, h] (fp32) and keys (its own CSA
    compressor's entries). Its inputs x and cq are detached: the indexer's loss reaches only its
    parameters, and the selection carries no gradient into the model. Parameters with the
    ``v4jax.quant.IndexerQK`` marker (``train.indexer_fp4``) rotate and quantise queries and keys."""
    x, cq = jax.lax.stop_gradient(x), jax.lax.stop_gradient(cq)
    keys = make_entries(x, p["compressor"], positions, segment_ids, m, True, freqs, config.rms_norm_eps)
    q, w = indexer_queries(x, cq, p, config, rope_angles(freqs, positions))
    if "qk" in p:  # train.indexer_fp4: V4's quantisation-aware indexer (v4jax.quant.IndexerQK)
        q, keys = indexer_qk(q, p["qk"]), keys._replace(keys=indexer_qk(keys.keys, p["qk"]))
    return q, w, keys


def indexer_queries(x, cq, p, config: ModelConfig, angles):
    """The indexer's queries [b, s, h, c] (RoPE'd with ``angles`` = (cos, sin) at the queries'
    positions) and per-head weights [b, s, h] fp32 (with the 1/sqrt(c h) scale)."""
    b, s, _ = x.shape
    h, c = config.index_n_heads, config.index_head_dim
    q = apply_rope(linear(cq, p["wq_b"]).reshape(b, s, h, c), *angles)
    w = linear_f32(x, p["weights_proj"]) * (c**-0.5 * h**-0.5)
    return q, w



@jax.named_scope("indexer")
def indexer_topk(q, w, keys: Entries, segment_ids, positions, k: int, *, query_chunk: int = QUERY_CHUNK,
                 key_chunk: int = KEY_CHUNK) -> jax.Array:
    """The top-k entries of each query by I[t, i] = sum_h w[t, h] relu(q[t, h] . K[i]) over the
    entries t sees (spec §2.6.4), in fp32. Not differentiable: it only selects.

    q [b, s, h, c]; w [b, s, h]; keys: the indexer's entries. Returns idx [b, s, min(k, e)] int32,
    -1 in the slots a query with fewer visible entries leaves empty. Queries go in chunks of
    ``query_chunk``. Entries that fit one block of ``key_chunk`` (a decode step, a short sequence)
    take one ``jax.lax.top_k``; more are scanned in such blocks, merging a running top-k, up to the
    last block that any of the chunk's queries can see. Ties go to the lower entry index, as in one
    ``jax.lax.top_k`` over all entries.
    """
    q, w, keys = jax.lax.stop_gradient((q, w, keys))
    b, s, h, c = q.shape
    e = keys.keys.shape[1]
    k = min(k, e)
    qc = min(query_chunk, s)
    n_q = -(-s // qc)
    kc = min(key_chunk, e)
    n_k = -(-e // kc)
    keys = Entries(*(pad_tokens(a, n_k * kc, fill) for a, fill in zip(keys, (0, -1, 0, 0, False))))

    def scores_of(qb, wb, seg, pos, blk: Entries):  # [b, qc, kc]: -inf where not visible
        dots = jnp.einsum("bqhc,bkc->bqhk", qb, blk.keys, preferred_element_type=F32)
        return jnp.where(blk.visible(seg, pos), _index_scores(wb, dots), NEG_INF)

    def chunks(fn, *extra):
        xs = (to_chunks(pad_tokens(q, n_q * qc, 0), n_q), to_chunks(pad_tokens(w, n_q * qc, 0), n_q),
              to_chunks(pad_tokens(segment_ids, n_q * qc, -2), n_q),
              to_chunks(pad_tokens(positions, n_q * qc, 0), n_q)) + extra
        return from_chunks(jax.lax.map(fn, xs), s)

    if n_k == 1:
        # No loop: a decode step runs this in every CSA layer, and a loop with a traced trip count
        # (and the merge's jax.lax.cond) has XLA on a GPU read its predicate on the host.
        def one_block(xs):
            vals, ids = jax.lax.top_k(scores_of(*xs, keys), k)
            return jnp.where(vals > NEG_INF, ids, -1)

        return chunks(one_block)

    # A chunk can see only entries whose block ended by its last row; valid entries come first, in
    # row order, so that is a prefix of the entry axis.
    ends = jnp.where(keys.valid, keys.last_row, jnp.iinfo(jnp.int32).max)
    chunk_last = jnp.minimum(jnp.arange(n_q) * qc + qc - 1, s - 1)
    seen = jnp.max(jax.vmap(lambda en: jnp.searchsorted(en, chunk_last, side="right"))(ends), axis=0)  # [n_q]
    blocks = (seen + kc - 1) // kc

    room = 2 * k  # candidates a block may hand to the merge after the threshold filter

    def merge(vals, ids, cand_vals, cand_ids):
        # the running best come first: among equal scores they hold the lower entry indices
        vals, at = jax.lax.top_k(jnp.concatenate([vals, cand_vals], axis=-1), k)
        return vals, jnp.take_along_axis(jnp.concatenate([ids, cand_ids], axis=-1), at, axis=-1)

    def chunk(xs):
        qb, wb, seg, pos, nb = xs  # [b, qc, h, c], [b, qc, h], [b, qc], [b, qc], []

        def step(j, best):
            vals, ids = best
            blk = Entries(*(jax.lax.dynamic_slice_in_dim(a, j * kc, kc, axis=1) for a in keys))
            scores = scores_of(qb, wb, seg, pos, blk)
            cand_ids = jnp.broadcast_to(j * kc + jnp.arange(kc, dtype=jnp.int32), scores.shape)
            # Only scores above the current k-th best can enter (an equal one loses to the lower
            # index already held). Once that threshold is up, a block has few such scores: pack
            # them into `room` slots, in entry order, so the top_k sorts 3k values, not k + kc.
            passing = scores > vals[..., k - 1:k]
            slot = jnp.where(passing, jnp.cumsum(passing, axis=-1) - 1, room)  # room: dropped

            def packed(_):
                put = jax.vmap(jax.vmap(lambda dst, sl, v: dst.at[sl].set(v, mode="drop")))
                return merge(vals, ids, put(jnp.full(vals.shape[:-1] + (room,), NEG_INF), slot, scores),
                             put(jnp.full(vals.shape[:-1] + (room,), -1, jnp.int32), slot, cand_ids))

            fits = jnp.max(jnp.sum(passing, axis=-1)) <= room
            return jax.lax.cond(fits, packed, lambda _: merge(vals, ids, scores, cand_ids), None)

        init = (jnp.full((b, qc, k), NEG_INF, F32), jnp.full((b, qc, k), -1, jnp.int32))
        vals, ids = jax.lax.fori_loop(0, nb, step, init)
        return jnp.where(vals > NEG_INF, ids, -1)

    return chunks(chunk, blocks)


@jax.named_scope("indexer")
def indexer_scores_at(q, w, keys: jax.Array, idx, *, query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """The indexer scores of the selected entries, differentiable in q, w and keys (for the KL loss).

    q [b, s, h, c], w [b, s, h], keys [b, e, c], idx [b, s, k] -> [b, s, k] fp32 (-inf where idx < 0),
    computed over chunks of queries (each recomputed in the backward pass).
    """
    b, s = idx.shape[:2]
    qc = min(query_chunk, s)
    n_q = -(-s // qc)

    def chunk(xs):
        qb, wb, ib = xs
        return jnp.where(ib >= 0, _index_scores(wb, listed_dot(qb, keys, ib)), NEG_INF)

    xs = tuple(to_chunks(pad_tokens(a, n_q * qc, fill), n_q) for a, fill in ((q, 0), (w, 0), (idx, -1)))
    return from_chunks(jax.lax.map(jax.checkpoint(chunk, prevent_cse=False), xs), s)


@jax.named_scope("indexer")
def indexer_scores_dense(q, w, keys: Entries, segment_ids, positions) -> jax.Array:
    """Every entry's indexer score, [b, s, e] fp32 (-inf where not visible). O(s * e) memory: for
    the dense warm-up stage at short context only."""
    dots = jnp.einsum("bqhc,bkc->bqhk", q, keys.keys, preferred_element_type=F32)
    return jnp.where(keys.visible(segment_ids, positions), _index_scores(w, dots), NEG_INF)


# --------------------------------------------------------------------------------------------------
# The attention module


@jax.named_scope("attention")
def attention(x: jax.Array, p: dict, config: ModelConfig, layer: int, positions: jax.Array,
              segment_ids: jax.Array, sparse: bool = True, with_aux: bool = False, parallel=None, mesh=None):
    """x: [b, s, d] (the attn_norm output) -> (out [b, s, d], aux). ``layer`` == L is the MTP layer.

    ``sparse=False`` lets CSA queries use every visible compressed entry (the dense training stage).
    With ``with_aux``, aux holds what the indexer loss needs for a CSA layer: ``index_scores``,
    ``entry_probs`` (main-attention probability summed over heads) and ``entry_mask`` (slot used),
    each [b, s, k] over the selected entries, or [b, s, e] over all entries in the dense stage
    (which holds O(s * e) scores and is meant for short contexts). Otherwise aux is {}.
    ``parallel`` (a ``v4jax.parallel.ParallelConfig``) sets the chunk sizes and the attention kernel.
    On a ``mesh`` with a ``context`` axis the tokens are split over it (``v4jax.context``); the
    result is the same.
    """
    args = (config, layer, sparse, with_aux, parallel)
    if context.ways(mesh) == 1:
        return _attention(x, p, positions, segment_ids, *args)
    return _context_parallel(x, p, positions, segment_ids, *args, mesh=mesh)


def context_halo(config: ModelConfig, layer: int) -> int:
    """The rows before a query's own slice that its layer reads: the window's W-1 keys, and the
    compressor's first row of a block that ends in the slice (CSA: of the block before it too)."""
    kind, m = config.layer_type(layer), config.layer_ratio(layer)
    return max(config.sliding_window - 1, {SWA: 0, CSA: 2 * m - 1}.get(kind, m - 1))


def _context_parallel(x, p, positions, segment_ids, config, layer, sparse, with_aux, parallel, mesh):
    """``_attention`` with the tokens split over the mesh's ``context`` axis: each device runs its
    own queries over its slice, the slices' last rows before it (``context.from_left``) and every
    slice's compressed entries (``context.share_entries``). A length the axis does not divide is
    padded at the end with rows of a document of their own (segment id -1), cut from the result."""
    ways, s = context.ways(mesh), x.shape[1]
    pad = -s % ways
    if pad:
        x = pad_tokens(x, s + pad, 0)
        positions, segment_ids = pad_tokens(positions, s + pad, 0), pad_tokens(segment_ids, s + pad, -1)
    halo = context_halo(config, layer)

    def local(x, p, positions, segment_ids):  # x [b, s/C, d]: this device's slice of every row
        row0 = jax.lax.axis_index(context.AXIS) * x.shape[1] - halo  # global row of the extended array's row 0
        extend = lambda a, fill: jnp.concatenate([context.from_left(a, halo, ways, fill), a], axis=1)  # noqa: E731
        share = functools.partial(context.share_entries, halo=halo, row0=row0)
        out, aux = _attention(extend(x, 0), p, extend(positions, 0), extend(segment_ids, -1), config, layer, sparse,
                              with_aux, parallel, share)
        return out[:, halo:], {k: v[:, halo:] for k, v in aux.items()}

    rows = PartitionSpec(None, context.AXIS)
    out, aux = jax.shard_map(local, mesh=mesh, in_specs=(rows, PartitionSpec(), rows, rows), out_specs=rows,
                             axis_names={context.AXIS}, check_vma=False)(x, p, positions, segment_ids)
    return out[:, :s], {k: v[:, :s] for k, v in aux.items()}


def _attention(x, p, positions, segment_ids, config: ModelConfig, layer: int, sparse: bool, with_aux: bool, parallel,
               share=None):
    """``attention`` on the rows at hand. ``share(entries) -> entries`` (context parallelism) turns
    the entries made from these rows into those the queries see."""
    eps = config.rms_norm_eps
    kind, m = config.layer_type(layer), config.layer_ratio(layer)
    q_chunk = parallel.attention_chunk if parallel else QUERY_CHUNK
    k_chunk = parallel.indexer_key_chunk if parallel else KEY_CHUNK
    share = share or (lambda entries: entries)
    freqs = rope_frequencies(config, layer)
    cos, sin = rope_angles(freqs, positions)
    cq, q, kv = project(x, p, config, (cos, sin))

    entries = idx = None
    aux = {}
    if kind != SWA:
        entries = share(make_entries(x, p["compressor"], positions, segment_ids, m, kind == CSA, freqs, eps))
        if kind == CSA and entries.keys.shape[1] > 0 and (sparse or with_aux):
            iq, iw, ikeys = indexer_inputs(x, cq, p["indexer"], positions, segment_ids, config, freqs, m)
            ikeys = share(ikeys)
            if sparse:
                idx = indexer_topk(iq, iw, ikeys, segment_ids, positions, config.index_topk, query_chunk=q_chunk,
                                   key_chunk=k_chunk)
                if with_aux:
                    aux = {"index_scores": indexer_scores_at(iq, iw, ikeys.keys, idx, query_chunk=q_chunk),
                           "entry_mask": idx >= 0}
            else:
                aux = {"index_scores": indexer_scores_dense(iq, iw, ikeys, segment_ids, positions),
                       "entry_mask": entries.visible(segment_ids, positions)}

    if parallel is not None and parallel.attention_kernel == "pallas":
        attend_list = pallas_sparse_attention
    else:
        mask_ratio = parallel.csa_mask_ratio if parallel else MASK_RATIO
        attend_list = functools.partial(sparse_attention, mask_ratio=mask_ratio)
    o, probs = attend_list(q, kv, p["attn_sink"], segment_ids, positions, config.sliding_window, entries, idx,
                           query_chunk=q_chunk, with_probs=bool(aux))
    if aux:
        aux["entry_probs"] = probs
    return output_projection(o, p, config, (cos, sin)), aux


def project(x, p, config: ModelConfig, angles):
    """x [b, s, d] -> the low-rank query cq [b, s, r], the queries [b, s, h, c] and the one K=V head
    [b, s, c], RoPE'd with ``angles`` = (cos, sin) at the tokens' positions."""
    b, s, _ = x.shape
    h, c, eps = config.num_attention_heads, config.head_dim, config.rms_norm_eps
    cq = rms_norm(linear(x, p["wq_a"]), p["q_norm"], eps)
    q = apply_rope(rms_norm(linear(cq, p["wq_b"]).reshape(b, s, h, c), None, eps), *angles)  # weight-free norm
    kv = apply_rope(rms_norm(linear(x, p["wkv"]), p["kv_norm"], eps), *angles)
    return cq, q, kv


def output_projection(o, p, config: ModelConfig, angles):
    """The attention output o [b, s, h, c], de-rotated at the query positions, through the g-group
    low-rank projection: -> [b, s, d]."""
    b, s = o.shape[:2]
    o = apply_rope(o, *angles, inverse=True)
    g = config.o_groups
    wa = weight_values(p["wo_a"], o.dtype).reshape(g, config.o_lora_rank, -1)  # [g, d_g, h*c/g]
    z = jnp.einsum("bsgi,gri->bsgr", o.reshape(b, s, g, -1), wa)
    return linear(z.reshape(b, s, -1), p["wo_b"])


# --------------------------------------------------------------------------------------------------
# The modules: parameters (release names), each with its declaration


class Compressor(nnx.Module):
    """A KV compressor: per-channel softmax pooling of m tokens (HCA) or 2m overlapping ones (CSA:
    ``wkv``/``wgate`` rows are the previous- and current-block projections, two matrices for Muon)."""

    def __init__(self, config: ModelConfig, init: Init, head_dim: int, m: int, overlap: bool):
        d, k = config.hidden_size, 2 if overlap else 1
        blocks = (head_dim, head_dim) if overlap else None
        self.wkv = declare(init, matrix((k * head_dim, d), (None, "embed"), row_blocks=blocks))
        self.wgate = declare(init, matrix((k * head_dim, d), (None, "embed"), row_blocks=blocks))
        self.ape = declare(init, vector((m, k * head_dim), init="zeros", kind="f32"))
        self.norm = declare(init, vector((head_dim,)))


class Indexer(nnx.Module):
    """The lightning indexer of a CSA layer: its query projection, per-head weights and compressor."""

    def __init__(self, config: ModelConfig, init: Init, m: int):
        h, c = config.index_n_heads, config.index_head_dim
        self.wq_b = declare(init, matrix((h * c, config.q_lora_rank), ("heads", None), export="fp8"))
        self.weights_proj = declare(init, matrix((h, config.hidden_size), ("heads", "embed")))
        self.compressor = Compressor(config, init, c, m, True)


class Attention(nnx.Module):
    """One layer's attention (its kind from ``config.layer_type(layer)``; layer L is the MTP block's).

    Calling it runs ``attention`` on its parameters: x [b, s, d] -> (out [b, s, d], aux)."""

    def __init__(self, config: ModelConfig, layer: int, init: Init):
        d, h, c, r = config.hidden_size, config.num_attention_heads, config.head_dim, config.q_lora_rank
        g, dg = config.o_groups, config.o_lora_rank
        kind, m = config.layer_type(layer), config.layer_ratio(layer)
        self.config, self.layer = config, layer
        self.wq_a = declare(init, matrix((r, d), (None, "embed"), export="fp8"))
        self.q_norm = declare(init, vector((r,)))
        self.wq_b = declare(init, matrix((h * c, r), ("heads", None), export="fp8"))
        self.wkv = declare(init, matrix((c, d), (None, "embed"), export="fp8"))
        self.kv_norm = declare(init, vector((c,)))
        # group j's rows only multiply head group j's outputs: g matrices for Muon
        self.wo_a = declare(init, matrix((g * dg, h * c // g), ("heads", None), export="fp8",
                                         row_blocks=(dg,) * g if g > 1 else None))
        self.wo_b = declare(init, matrix((d, g * dg), ("embed", "heads"), export="fp8"))
        self.attn_sink = declare(init, vector((h,), ("heads",), init="zeros", kind="f32"))
        if kind != SWA:
            self.compressor = Compressor(config, init, c, m, kind == CSA)
        if kind == CSA:
            self.indexer = Indexer(config, init, m)

    def __call__(self, x, positions, segment_ids, sparse: bool = True, with_aux: bool = False, parallel=None,
                 mesh=None):
        return attention(x, pure(self), self.config, self.layer, positions, segment_ids, sparse, with_aux, parallel,
                         mesh)
