"""Context parallelism: a sequence split over the mesh's ``context`` axis (its C devices hold
consecutive slices of s/C tokens of every row).

Everything but the attention works token by token, so splitting the token axis of activations is
enough for it (XLA partitions the few shifts, e.g. MTP's next token). What a query needs from other
tokens is small and regular in V4 (spec §2.6), and these helpers, run inside a ``shard_map`` over
``context``, fetch exactly that:

* ``from_left``: the last rows of the previous slices (the sliding window's W-1 keys, the
  compressor's overlapping block), by ``ppermute``;
* ``share_entries``: the compressed entries (one c-wide key per m tokens; the indexer's too), by
  ``all_gather``, so each device runs its own queries' index-list attention unchanged.

Every query attends to at most W + top-k (CSA) or W + s/m (HCA) keys wherever it sits, so the
attention's work per device stays balanced without reordering the sequence (the lightning
indexer's scan is causal: the last slice scores the most entries). The backward pass of each
collective is its transpose (the halo's gradients travel back to their owner; the entries'
gradients are reduce-scattered).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.index_list import Entries

AXIS = "context"


def ways(mesh) -> int:
    """How many devices split the sequence: the mesh's ``context`` axis (1 without a mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(AXIS, 1))


def from_left(x: jax.Array, n: int, slices: int, fill) -> jax.Array:
    """The n rows before this slice along axis 1 (the previous slices' last rows), ``fill`` where the
    sequence has none (before its start). Inside a shard_map over ``context`` of ``slices`` devices:
    x [b, s/C, ...] -> [b, n, ...], from up to ceil(n / (s/C)) slices back."""
    s_local = x.shape[1]
    if n == 0:
        return x[:, :0]
    me = jax.lax.axis_index(AXIS)
    hops = -(-n // s_local)
    sent = x[:, s_local - n:] if hops == 1 else x
    pieces = []
    for hop in range(hops, 0, -1):  # the farthest slice first
        if hop >= slices:
            got = jnp.full_like(sent, fill)
        else:
            got = jax.lax.ppermute(sent, AXIS, [(i, i + hop) for i in range(slices - hop)])
            got = jnp.where(me >= hop, got, jnp.asarray(fill, sent.dtype))
        pieces.append(got)
    return jnp.concatenate(pieces, axis=1)[:, -n:]


def share_entries(entries: Entries, halo: int, row0: jax.Array) -> Entries:
    """Every slice's compressed entries, for this slice's queries. Inside a shard_map over ``context``.

    ``entries`` were made from this slice's rows with ``halo`` rows of the previous slices in front
    (``from_left``), so blocks that start there are complete; ``row0`` is the global row of that
    extended array's first row. A block belongs to the slice that holds its last row, so each is
    kept once. The result has the entries of all slices, the valid ones first and in row order (as
    ``v4jax.attention.compressed_entries`` orders them), with ``last_row`` in the extended array's
    frame (negative before it): what the indexer's scan bound and the Pallas kernels' ranges read.
    """
    mine = entries.valid & (entries.last_row >= halo)
    every = Entries(*(jax.lax.all_gather(a, AXIS, axis=1, tiled=True)
                      for a in entries._replace(valid=mine, last_row=entries.last_row + row0)))
    # valid first; the slices, hence the rows, stay in order
    order = jnp.argsort((~every.valid).astype(jnp.int32), axis=1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    every = Entries(*(take(a) for a in every))
    return every._replace(last_row=every.last_row - row0)
