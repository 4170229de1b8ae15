"""The index-list attention with the sink as Pallas kernels (Triton on GPU), forward and backward.

Shape letters as in ``v4jax.index_list``: b batch, s tokens, h heads (H once padded), c head dim, e
compressed entries, k listed slots, n = s + e rows of the key array, l slots of one block.

``pallas_sparse_attention`` has the contract of ``v4jax.index_list.sparse_attention`` and computes
the same softmax: query t over its window keys, its compressed entries and a per-head sink logit
with a zero value, value = key, one K=V head shared by every query head. The keys are one array
``[kv ; entries.keys]`` [b, n, c], and query t's index list into it has three parts:

    window            rows t-W+1 .. t of t's document
    listed entries    CSA: rows s + entry_idx[t] (-1 = empty)
    visible entries   HCA, or CSA in the dense stage: rows s + i for the entries t sees

The list is never materialised: each kernel builds it block by block (l slots at a time) from what
defines it: t and W for the window, ``entry_idx`` for CSA, and for "every entry" a range [lo, hi)
of the entry axis, which covers all the entries t sees (a document's complete blocks are
consecutive entries, those that ended by t a prefix of them) and is masked exactly as
``Entries.visible``. A materialised HCA list would hold every entry for every query, O(s * e)
indices (35 GB at 1M tokens with ratio 128); the range is two integers per query, and the loop
skips the entries of other documents and those not yet complete. So memory is linear in s, and no
tensor holds the gathered keys of more than one block of one query.

Forward (one program per (batch row, query); all heads are the M side of the dots): per block,
gather the l key rows, logits [H, l] = q K^T, an online softmax seeded with the sink (running max =
sink, sum = 1, so the max is always finite and masked slots add exp(-inf) = 0), out += P K. Writes
out and lse = log(sum over the list and the sink).

Backward (same grid, P recomputed from lse): with Delta = rowsum(dO * O) - d_lse,
dS = P * (dO K^T - Delta); dQ = scale dS K; the block's key rows get scale dS^T Q + P^T dO (K = V, so
both terms land in one buffer) through fp32 atomic adds into a [b, n + l, c] accumulator, and
d_sink[h] = -sum_t exp(sink_h - lse_t) Delta_t. A cotangent on lse (the entry probabilities for the
indexer loss are computed from it) enters through Delta exactly.

Empty slots of a block are redirected to l spare rows past the key array: the interpreter's
atomic add takes no mask and sets (not adds) repeated rows, so each slot of a block needs a row of
its own (a query lists a key once). On GPU the add is also masked, so the spare rows see no traffic.

The kernels run with ``interpret=True`` when the default backend is the CPU (tests), natively
otherwise. On GPU the padded head count H (>= 16, the smallest Triton dot), c and the block sizes
must be powers of two. ``Blocks`` holds the tiling; the defaults fit c = 512 (the release) in an
H100/H200's registers.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from v4jax import devices
from v4jax.index_list import QUERY_CHUNK, Entries, from_chunks, listed_dot, pad_tokens, sparse_attention, to_chunks
from v4jax.layers import F32, einsum_f32

MIN_HEADS = 16  # Triton's smallest dot operand side: the heads are padded up to it


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tiling of the kernels: index-list slots per step of the forward and the backward kernel,
    warps per program and software-pipeline stages. Powers of two on GPU."""

    forward: int
    backward: int
    num_warps: int
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, c: int) -> Blocks:
        # Measured on an H200 (bench/attention_kernel.py shapes, bf16): 4 warps beat 8 in both
        # kernels. At c = 512 the backward holds q, dO, the dQ accumulator and a block's keys and
        # key gradient at once, and 64-slot blocks exceed the shared memory (256 KB asked, 227 KB
        # there); 16 slots were fastest.
        if c <= 128:
            return cls(forward=64, backward=32, num_warps=4)
        return cls(forward=32, backward=16, num_warps=4)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the kernels know statically: the window, the split of the key array (s window rows,
    then e entries), which entry part the list has ("none" | "listed" | "visible"), the tiling."""

    window: int
    rows: int
    entries: int
    mode: str
    blocks: Blocks
    interpret: bool


def pallas_sparse_attention(q, kv, sink, segment_ids, positions, window: int, entries: Entries | None = None,
                            entry_idx=None, *, query_chunk: int = QUERY_CHUNK, with_probs: bool = False,
                            blocks: Blocks | None = None):
    """``v4jax.index_list.sparse_attention`` through the Pallas kernels (same arguments, same outputs).

    q [b, s, h, c]; kv [b, s, c]; sink [h] fp32; segment_ids, positions [b, s]; ``entries`` (None for
    SWA) with ``entry_idx`` [b, s, k] (CSA's listed entries, -1 = empty, each listed once) or None
    (every visible entry). Returns (out [b, s, h, c] in q's dtype, probs): with ``with_probs`` each
    compressed slot's probability summed over heads ([b, s, k], or [b, s, e] for every entry,
    computed from the kernel's lse over ``query_chunk`` queries at a time), else None. ``blocks``
    overrides the tiling (default ``Blocks.for_head_dim(c)``). Where the kernels do not run
    (``runs_on``: a TPU, a GPU older than compute capability 8.0) this warns and returns
    ``sparse_attention``'s result.
    """
    if not runs_on(devices.current()):
        warnings.warn("parallel.attention_kernel='pallas' needs an NVIDIA GPU of compute capability >= 8.0 "
                      "(or the CPU's interpreter); using the xla attention", stacklevel=2)
        return sparse_attention(q, kv, sink, segment_ids, positions, window, entries, entry_idx,
                                query_chunk=query_chunk, with_probs=with_probs)
    _, s, h, c = q.shape
    interpret = jax.default_backend() == "cpu"
    blocks = blocks or Blocks.for_head_dim(c)
    n_heads = max(MIN_HEADS, pl.next_power_of_2(h))
    if not interpret and (c & (c - 1) or c < 16 or any(x & (x - 1) for x in (blocks.forward, blocks.backward))):
        raise ValueError(f"the Triton attention kernels need a power-of-two head_dim >= 16 and block sizes, "
                         f"got head_dim={c}, blocks={blocks}")
    has_entries = entries is not None and entries.keys.shape[1] > 0
    e = entries.keys.shape[1] if has_entries else 0
    seg, pos = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
    lists = (seg, pos)
    if not has_entries:
        mode, keys = "none", kv
    else:
        keys = jnp.concatenate([kv, entries.keys.astype(kv.dtype)], axis=1)
        if entry_idx is not None:
            mode = "listed"
            step = max(blocks.forward, blocks.backward)
            k_pad = -(-entry_idx.shape[2] // step) * step
            lists += (jnp.pad(entry_idx.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad - entry_idx.shape[2])),
                              constant_values=-1),)
        else:
            mode = "visible"
            lists += (*_visible_range(entries, pos), entries.seg.astype(jnp.int32), entries.last.astype(jnp.int32),
                      entries.valid.astype(jnp.int32))
    layout = _Layout(window, s, e, mode, blocks, interpret)
    q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, n_heads - h), (0, 0)))  # zero queries: their rows are dropped
    sink_pad = jnp.pad(sink.astype(F32), (0, n_heads - h))
    out, lse = _attend(layout, q_pad, keys.astype(q.dtype), sink_pad, lists)
    out, lse = out[:, :, :h], lse[:, :, :h]
    probs = None
    if with_probs and has_entries:
        probs = _entry_probs(q, lse, entries, entry_idx, seg, pos, query_chunk)
    return out, probs


def runs_on(acc: devices.Accelerator) -> bool:
    """Whether the kernels run on ``acc``: a GPU that runs Pallas Triton, or the CPU (interpreted)."""
    return acc.platform == "cpu" or devices.pallas_triton(acc)


def _visible_range(entries: Entries, pos: jax.Array):
    """[lo, hi) per query [b, s] over the entry axis, holding every entry the query sees.

    Entries are in row order with the valid ones first, so ``ends`` (the row of each entry's last
    token) is sorted. Query t sees only entries of its document (rows from t - pos(t) on) whose
    block ended by row t: those with t - pos(t) <= end <= t (``indexer_topk`` bounds its scan by the
    second inequality). The kernels mask the range exactly as ``Entries.visible``.
    """
    ends = jnp.where(entries.valid, entries.last_row, jnp.iinfo(jnp.int32).max).astype(jnp.int32)
    rows = jnp.arange(pos.shape[1], dtype=jnp.int32)
    lo = jax.vmap(lambda en, p: jnp.searchsorted(en, rows - p, side="left"))(ends, pos)
    hi = jax.vmap(lambda en: jnp.searchsorted(en, rows, side="right"))(ends)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _entry_probs(q, lse, entries: Entries, entry_idx, seg, pos, query_chunk: int):
    """Each compressed slot's attention probability summed over heads, exp(logit - lse): [b, s, k]
    over the listed entries (0 where empty) or [b, s, e] over all (0 where not visible), over
    chunks of queries (each recomputed in the backward pass). Differentiable, lse included."""
    s, c = q.shape[1], q.shape[3]
    scale = c**-0.5
    qc = min(query_chunk, s)
    n_q = -(-s // qc)

    def chunk(xs):
        if entry_idx is not None:
            qb, lb, ib = xs
            logits, ok = listed_dot(qb, entries.keys, ib) * scale, ib >= 0
        else:
            qb, lb, sb, pb = xs
            logits = einsum_f32("bqhc,bkc->bqhk", qb, entries.keys) * scale
            ok = entries.visible(sb, pb)
        # masked logits are finite (a listed -1 reads entry 0), so where() passes no NaN gradient
        return jnp.sum(jnp.where(ok[:, :, None, :], jnp.exp(logits - lb[..., None]), 0.0), axis=2)

    tail = ((entry_idx, -1),) if entry_idx is not None else ((seg, -2), (pos, 0))
    xs = tuple(to_chunks(pad_tokens(a, n_q * qc, fill), n_q) for a, fill in ((q, 0), (lse, 0), *tail))
    return from_chunks(jax.lax.map(jax.checkpoint(chunk, prevent_cse=False), xs), s)


# --------------------------------------------------------------------------------------------------
# The differentiable core: (q [b, s, H, c], keys [b, n, c], sink [H], lists) -> (out, lse [b, s, H])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(layout: _Layout, q, keys, sink, lists):
    return _forward(layout, q, keys, sink, lists)


def _attend_fwd(layout, q, keys, sink, lists):
    out, lse = _forward(layout, q, keys, sink, lists)
    return (out, lse), (q, keys, sink, lists, out, lse)


def _attend_bwd(layout, res, g):
    q, keys, sink, lists, out, lse = res
    d_out, d_lse = g
    # d lse / d logit_j = p_j: a cotangent on lse shifts Delta by -d_lse for every slot and the sink
    delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1) - d_lse  # [b, s, H]
    dq, dkeys = _backward(layout, q, keys, lists, d_out, lse, delta)
    d_sink = -jnp.sum(jnp.exp(sink - lse) * delta, axis=(0, 1))
    return dq, dkeys.astype(keys.dtype), d_sink, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _specs(lists):
    """BlockSpecs on the (batch row i, query t) grid of the integer inputs: per-query rows [b, s, k]
    give the query's row, [b, s] and [b, e] arrays the batch row's whole row."""
    def spec(a):
        if a.ndim == 3:
            return pl.BlockSpec((None, None, a.shape[2]), lambda i, t: (i, t, 0))
        return pl.BlockSpec((None, a.shape[1]), lambda i, t: (i, 0))
    return [spec(a) for a in lists]


def _query_specs(q, keys):
    n_heads, c = q.shape[2:]
    return [pl.BlockSpec((None, None, n_heads, c), lambda i, t: (i, t, 0, 0)),
            pl.BlockSpec((None, keys.shape[1], c), lambda i, t: (i, 0, 0))]


def _forward(layout: _Layout, q, keys, sink, lists):
    b, s, n_heads, _ = q.shape
    row = pl.BlockSpec((None, None, n_heads), lambda i, t: (i, t, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, layout, len(lists)),
        grid=(b, s),
        in_specs=[*_query_specs(q, keys), *_specs(lists), pl.BlockSpec((n_heads,), lambda i, t: (0,))],
        out_specs=[_query_specs(q, keys)[0], row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, s, n_heads), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=layout.blocks.num_warps, num_stages=layout.blocks.num_stages),
        interpret=layout.interpret,
        name="index_attention_fwd",
    )(q, keys, *lists, sink)


def _backward(layout: _Layout, q, keys, lists, d_out, lse, delta):
    b, s, n_heads, c = q.shape
    n = keys.shape[1]
    spare = layout.blocks.backward
    row = pl.BlockSpec((None, None, n_heads), lambda i, t: (i, t, 0))
    acc = pl.BlockSpec((None, n + spare, c), lambda i, t: (i, 0, 0))
    n_in = 2 + len(lists) + 3
    dq, dkeys = pl.pallas_call(
        functools.partial(_backward_kernel, layout, len(lists)),
        grid=(b, s),
        in_specs=[*_query_specs(q, keys), *_specs(lists), _query_specs(q, keys)[0], row, row, acc],
        out_specs=[_query_specs(q, keys)[0], acc],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n + spare, c), F32)],
        input_output_aliases={n_in: 1},  # the key gradient accumulates into zeros
        compiler_params=plgpu.CompilerParams(num_warps=layout.blocks.num_warps, num_stages=layout.blocks.num_stages),
        interpret=layout.interpret,
        name="index_attention_bwd",
    )(q, keys, *lists, d_out, lse, delta, jnp.zeros((b, n + spare, c), F32))
    return dq, dkeys[:, :n]


# --------------------------------------------------------------------------------------------------
# Kernels. Refs are one program's blocks: q [H, c], keys [n, c], seg/pos [s], a listed row [k],
# lo/hi [s], entry seg/last/valid [e]; t = pl.program_id(1) is the query's row.


def _dot(a, b, contract):
    """a . b over dims ``contract`` = (a's, b's) of 2-D operands, fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=F32)


def _gather(keys_ref, rows, ok):
    """The key rows [l] (in range; masked ones read as 0) -> [l, c]. Row and column indices are both
    integer arrays: the form the Triton lowering turns into a pointer tensor and the interpreter
    into a gather."""
    cols = jnp.arange(keys_ref.shape[1])
    return plgpu.load(keys_ref.at[rows[:, None], cols[None, :]], mask=ok[:, None], other=0.0)


def _over_list(layout: _Layout, lists, t, size: int, step, carry):
    """Run carry = step(carry, rows [l], ok [l]) over query t's index list, l = size slots at a time.

    rows index the key array (always in range); ok marks the slots the query attends to.
    """
    seg_ref, pos_ref, *extra = lists
    s, e = layout.rows, layout.entries
    lane = jnp.arange(size, dtype=jnp.int32)
    seg_t = seg_ref[t]

    def window(j, carry):  # slots t-W+1 .. t, in t's document
        u = t - layout.window + 1 + j * size + lane
        rows = jnp.clip(u, 0, s - 1)
        return step(carry, rows, (u >= 0) & (u <= t) & (seg_ref[rows] == seg_t))

    carry = jax.lax.fori_loop(0, -(-layout.window // size), window, carry)
    if layout.mode == "listed":
        (idx_ref,) = extra

        def listed(j, carry):
            i = idx_ref[pl.ds(j * size, size)]
            return step(carry, s + jnp.maximum(i, 0), i >= 0)

        carry = jax.lax.fori_loop(0, idx_ref.shape[0] // size, listed, carry)
    elif layout.mode == "visible":
        lo_ref, hi_ref, eseg_ref, elast_ref, valid_ref = extra
        lo, hi, pos_t = lo_ref[t], hi_ref[t], pos_ref[t]

        def visible(j, carry):  # Entries.visible over the range [lo, hi)
            i = lo + j * size + lane
            ie = jnp.minimum(i, e - 1)
            ok = (i < hi) & (valid_ref[ie] != 0) & (eseg_ref[ie] == seg_t) & (elast_ref[ie] <= pos_t)
            return step(carry, s + ie, ok)

        carry = jax.lax.fori_loop(0, jax.lax.div(jnp.maximum(hi - lo, 0) + size - 1, size), visible, carry)
    return carry


def _forward_kernel(layout: _Layout, n_lists, q_ref, keys_ref, *refs):
    lists, (sink_ref, out_ref, lse_ref) = refs[:n_lists], refs[n_lists:]
    q = q_ref[...]  # [H, c]
    scale = q.shape[1] ** -0.5

    def step(carry, rows, ok):
        acc, mx, total = carry  # [H, c], [H], [H]: the running sum of p v, max logit, sum of p
        k = _gather(keys_ref, rows, ok)
        logits = jnp.where(ok[None, :], _dot(q, k, (1, 1)) * scale, -jnp.inf)  # [H, l]
        new_mx = jnp.maximum(mx, jnp.max(logits, axis=1))
        fade = jnp.exp(mx - new_mx)
        p = jnp.exp(logits - new_mx[:, None])
        acc = acc * fade[:, None] + _dot(p.astype(k.dtype), k, (1, 0))
        return acc, new_mx, total * fade + jnp.sum(p, axis=1)

    sink = sink_ref[...]
    init = (jnp.zeros(q.shape, F32), sink, jnp.ones_like(sink))  # the sink: logit sink, value 0
    acc, mx, total = _over_list(layout, lists, pl.program_id(1), layout.blocks.forward, step, init)
    out_ref[...] = (acc / total[:, None]).astype(out_ref.dtype)
    lse_ref[...] = mx + jnp.log(total)


def _backward_kernel(layout: _Layout, n_lists, q_ref, keys_ref, *refs):
    lists = refs[:n_lists]
    d_out_ref, lse_ref, delta_ref, _, dq_ref, dkeys_ref = refs[n_lists:]
    q, d_out = q_ref[...], d_out_ref[...]  # [H, c]
    lse, delta = lse_ref[...], delta_ref[...]  # [H]
    scale = q.shape[1] ** -0.5
    n = keys_ref.shape[0]
    size = layout.blocks.backward
    lane = jnp.arange(size, dtype=jnp.int32)
    cols = jnp.arange(q.shape[1])

    def step(dq, rows, ok):
        k = _gather(keys_ref, rows, ok)
        logits = jnp.where(ok[None, :], _dot(q, k, (1, 1)) * scale, -jnp.inf)
        p = jnp.exp(logits - lse[:, None])  # [H, l]
        ds = p * (_dot(d_out, k, (1, 1)) - delta[:, None])
        dk = _dot(ds.astype(q.dtype), q, (0, 0)) * scale + _dot(p.astype(q.dtype), d_out, (0, 0))  # [l, c]
        rows = jnp.where(ok, rows, n + lane)  # empty slots: a spare row each
        mask = None if layout.interpret else jnp.broadcast_to(ok[:, None], dk.shape)
        plgpu.atomic_add(dkeys_ref, (rows[:, None], cols[None, :]), dk, mask=mask)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = _over_list(layout, lists, pl.program_id(1), size, step, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
