"""DeepSeek-V4's optimiser: Muon (Algorithm 1 of the V4 report) plus AdamW, as optax transformations.

Muon, for every logically independent weight matrix W in R^{n x m} (spec A.1, architecture §4)::

    G_t = grad of the loss at W_{t-1}
    M_t = mu * M_{t-1} + G_t                          plain accumulating momentum (no dampening,
                                                      no bias correction), M_0 = 0
    X   = mu * M_t + G_t                              Nesterov look-ahead
    X   = X / (||X||_F + eps)                         Frobenius normalisation (eps = 1e-7)
    10 hybrid Newton-Schulz steps  X <- a X + b (X X^T) X + c (X X^T)^2 X
        steps 1-8: (a, b, c) = (3.4445, -4.7750, 2.0315), steps 9-10: (2, -1.5, 0.5)
        (X is transposed first when n > m, so that X X^T is the smaller Gram matrix)
    O_t = X * sqrt(max(n, m)) * gamma                 update RMS ~ gamma = 0.18
    W_t = W_{t-1} * (1 - eta * lambda) - eta * O_t    decoupled weight decay, eta = learning rate

``muon`` is built from optax blocks that give exactly these steps:
``optax.trace(mu, nesterov=True)`` (state M_t, output mu*M_t + G_t), then this module's
``scale_by_hybrid_newton_schulz`` (normalise, NS, rescale), ``optax.add_decayed_weights(lambda)``
and ``optax.scale_by_learning_rate(eta)``; the last two give W - eta*(O + lambda*W), which is the
same as W(1 - eta*lambda) - eta*O. The learning rate may be an optax schedule.

Why not ``optax.contrib.muon`` / ``scale_by_muon``: its momentum is an EMA with Adam-style bias
correction, so during the first ~1/(1-mu) steps the Nesterov input weights G against M
differently from V4's mu*M + G; its Newton-Schulz matmuls run at the backend's default precision
(TF32 on recent GPUs) with no bf16 option; and its shape scaling cannot split one leaf into row
blocks of unequal sizes. Its orthogonalisation is therefore re-implemented here (a few lines of
jnp), with the fp32 path at ``Precision.HIGHEST`` and a bf16 path whose matmul operands are bf16 and
whose accumulation and linear combinations stay fp32. Everything is plain jnp (einsum / reshape /
concatenate) inside jit, so sharded parameters work unchanged; nothing goes to the host.

On a device mesh (``v4_optimizer(..., mesh=)``, what train.py uses) the Newton-Schulz work is not done
where the parameters lie, which would repeat it on every device that holds a copy or a slice of a
matrix: ``orthogonalize_on_mesh`` pools the independent matrices by shape and spreads them over
every device, data replicas included, with the same numbers.

Which matrices are orthogonalised (one NS per logically independent matrix)
--------------------------------------------------------------------------
* A leaf's last two axes are the matrix ([out, in]); every leading axis is a batch of independent
  matrices. Routed experts ``ffn.experts.{w1,w3,w2}`` [E, out, in] therefore get one NS per expert
  and per projection, batched, and sqrt(max(n, m)) uses the per-expert shape. The layer axis of the
  scan layout (``stages``, v4jax.scan) is one more batch axis, so both layouts get the same updates.
* A leaf may further be split into *row blocks* (declared ``row_blocks``, gathered by
  ``muon_row_blocks``); each block is its own matrix (own Frobenius norm, own NS, own
  sqrt(max(rows_block, m)) scale). Equal consecutive blocks are batched. Row blocks are used for
  fused tensors whose rows are separate linear maps:

  - CSA compressor ``wkv``/``wgate`` [2c, d] (main and indexer compressors): rows [0:c] produce the
    previous-block series and rows [c:2c] the current-block series (spec §2.6.3). They are two
    projections that are only concatenated for one matmul, so they are two matrices. HCA
    compressors ([c, d]) are one matrix.
  - ``attn.wo_a`` [g*d_g, h*c/g]: group j's rows [j*d_g:(j+1)*d_g] only ever multiply head group
    j's outputs (a block-diagonal grouped projection stored compactly), so the g groups are g
    matrices [d_g, h*c/g].
  - mHC ``hc_attn``/``hc_ffn`` ``fn`` [(2+n)n, n*d]: split into pre [n, n*d], post [n, n*d] and
    comb [n^2, n*d] (``split_mhc_fn=True``, the default). The report leaves this open (spec A.7).
    We split because the three row blocks are the separate maps phi_pre, phi_post, phi_res of the
    mHC paper: each has its own gating factor (``scale[0..2]``), its own static bias block and a
    different nonlinearity (sigmoid, 2*sigmoid, Sinkhorn), exactly like the other fused tensors.
    ``split_mhc_fn=False`` orthogonalises the whole [(2+n)n, n*d] matrix instead. ``hc_head.fn``
    [n, n*d] has only pre rows and is one matrix.
  - Everything else (wq_a, wq_b, attention wkv [c, d], wo_b, indexer wq_b / weights_proj, router
    ``gate.weight`` [E, d], shared experts, MTP e_proj / h_proj) is one whole matrix. V4 does no
    per-head Muon (spec A.4), and the router's rows are compared against each other by top-k, so
    it is one matrix.

Parameter labels (``param_labels``; one per leaf, declared with the parameter in ``v4jax.params``)
--------------------------------------------------------------------------------------------------
* ``"muon"``: every float matrix not listed below (report: "all other modules are Muon").
* ``"adamw"`` (AdamW with weight decay 0.1): ``embed`` and ``head``, as the report says.
* ``"adamw_no_decay"`` (the same AdamW, weight decay 0): RMSNorm weights (every ``*norm`` leaf),
  mHC static biases and gating factors (``hc_*.base``, ``hc_*.scale``), attention sinks
  ``attn_sink`` and compressor position biases ``ape``, and any other leaf of rank < 2.
  Decisions: the report names AdamW for norms and mHC base/scale but not its decay mask; we exempt
  them because decaying a gain pulls it towards 0 rather than its neutral value 1, and the HC paper
  exempts the static mHC parts (spec A.7). ``attn_sink`` [h] is not a matrix, so it cannot be Muon;
  ``ape`` [m, k*c] is 2-D but is an additive bias indexed by position, not a linear map, so Muon's
  "orthogonal update" has no meaning for it; both are biases and get no decay, like the mHC bias.
  ``adam_decay_all=True`` decays every AdamW leaf instead.
* ``"frozen"`` (update exactly 0): ``ffn.gate.tid2eid`` (int32 hash table, not trained) and
  ``ffn.gate.bias`` (router bias, moved by the aux-loss-free rule outside the optimiser), and any
  integer leaf.

AdamW hyper-parameters (report §4.2.2): beta = (0.9, 0.95), eps = 1e-20, weight decay 0.1, the same
learning rate (or schedule) as Muon; the rescale gamma = 0.18 is what lets Muon share it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from v4jax.params import ADAMW, ADAMW_NO_DECAY, FROZEN, LABELS, MUON, TABLE, path_keys
from v4jax.schema import param_shardings, tree_infos

F32 = jnp.float32

#: 8 steps of Keller Jordan's coefficients, then 2 stabilising steps with p(1) = 1, p'(1) = 0.
HYBRID_NS_COEFFS: tuple[tuple[float, float, float], ...] = (
    ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2)


RowBlocks = tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# Newton-Schulz


def hybrid_newton_schulz(x: jax.Array, *, ns_dtype=F32, eps: float = 1e-7,
                         coeffs=HYBRID_NS_COEFFS, constrain=None) -> jax.Array:
    """Approximate polar factor of each matrix x[..., n, m] (leading axes are a batch). Returns fp32.

    X <- X / (||X||_F + eps) per matrix, then for each (a, b, c) in ``coeffs``:
    A = X X^T; X <- (a I + b A + c A A) X. When n > m this is computed on the smaller Gram matrix
    A = X^T X as X <- X (a I + b A + c A A), the same map (X (X^T X)^k = (X X^T)^k X), so X is never
    transposed (a transpose is a pass over X in memory each way).

    ns_dtype: dtype of the matmul operands, their products and the stored iterate X. fp32 runs at
    Precision.HIGHEST; bf16 (or another dtype) runs at default precision. The GEMMs accumulate and
    the polynomial's sum is computed in fp32 either way.

    constrain: None, or a function applied to the iterate X at every step (a sharding constraint,
    so that matrices split over devices stay split the same way through the loop).
    """
    constrain = constrain or (lambda a: a)
    if x.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {x.shape}")
    x = x.astype(F32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = x / (norm + eps)
    tall = x.shape[-2] > x.shape[-1]
    # (Gram matrix of X, P applied to X) as einsums over (X [..., n, m], X) and (P [..., r, r], X)
    gram_eq, apply_eq = (("...ki,...kj->...ij", "...ji,...kj->...ki") if tall else
                         ("...ik,...jk->...ij", "...ij,...jk->...ik"))
    ns_dtype = jnp.dtype(ns_dtype)
    precision = jax.lax.Precision.HIGHEST if ns_dtype == jnp.dtype(F32) else jax.lax.Precision.DEFAULT

    def mm(eq, a, b):
        # The products are written in ns_dtype (the GEMM still accumulates in fp32): with bf16, the
        # step's memory traffic, and the fp32 <-> bf16 conversion passes around each GEMM, were
        # most of the optimizer's time on an H200.
        return jnp.einsum(eq, a.astype(ns_dtype), b.astype(ns_dtype), precision=precision,
                          preferred_element_type=ns_dtype)

    eye = jnp.eye(min(x.shape[-2:]), dtype=F32)

    def step(x, abc):
        # a X + (b A + c A A) X is computed as (a I + b A + c A A) X: one GEMM writes the new X, with
        # no elementwise pass over X (an r x r polynomial is cheap; X is r x m with m >= r). The
        # polynomial is summed in fp32 and stored in ns_dtype, like every GEMM operand.
        a, b, c = abc[0], abc[1], abc[2]
        gram = mm(gram_eq, x, x)
        poly = a * eye + b * gram.astype(F32) + c * mm("...ij,...jk->...ik", gram, gram).astype(F32)
        return constrain(mm(apply_eq, poly, x)), None

    # Two steps per loop iteration: with one, the new X (a GEMM's output) cannot be written over the
    # carried X that the same GEMM reads, so XLA copied X back into the carry every step (on an H200
    # 15 ms a step for V4-Flash-8l's experts). With two, the second step writes over the first's input.
    x, _ = jax.lax.scan(step, constrain(x.astype(ns_dtype)), jnp.asarray(coeffs, F32), unroll=2)
    return x.astype(F32)


def _runs(blocks: RowBlocks) -> list[tuple[int, int]]:
    """(size, count) for each run of equal consecutive block sizes."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] == b:
            out[-1] = (b, out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def _block_runs(u: jax.Array, blocks: RowBlocks | None) -> list[tuple[int, int]]:
    """(size, count) runs of a Muon leaf's row blocks (default: one block), checked: the leaf is at
    least a matrix and the blocks partition its rows."""
    if u.ndim < 2:
        raise ValueError(f"Muon needs leaves of rank >= 2, got shape {u.shape}")
    rows = u.shape[-2]
    blocks = (rows,) if blocks is None else tuple(int(b) for b in blocks)
    if sum(blocks) != rows or min(blocks) <= 0:
        raise ValueError(f"row blocks {blocks} do not partition {rows} rows (shape {u.shape})")
    return _runs(blocks)


def orthogonalize(u: jax.Array, blocks: RowBlocks | None = None, *, rms_scale: float = 0.18,
                  ns_dtype=F32, eps: float = 1e-7) -> jax.Array:
    """NS(u) * sqrt(max(n, m)) * rms_scale for each matrix in u [..., R, m], in u's dtype.

    blocks: row-block sizes summing to R (default: one block). Each block [..., size, m] is its
    own matrix with its own normalisation and its own sqrt(max(size, m)); leading axes are batches.
    """
    cols = u.shape[-1]
    lead = u.shape[:-2]
    pieces, start = [], 0
    for size, count in _block_runs(u, blocks):
        seg = u[..., start:start + size * count, :].reshape(lead + (count, size, cols))
        o = hybrid_newton_schulz(seg, ns_dtype=ns_dtype, eps=eps) * (math.sqrt(max(size, cols)) * rms_scale)
        pieces.append(o.reshape(lead + (size * count, cols)))
        start += size * count
    out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-2)
    return out.astype(u.dtype)


# --------------------------------------------------------------------------------------------------
# Newton-Schulz spread over a device mesh

#: A stack of matrices is split along their smaller side (besides the stack's own axis) only when
#: that cuts the work per device by more than this factor: a split matrix exchanges its iterate
#: between devices at every Newton-Schulz step, a whole one only twice per update.
SPLIT_PENALTY = 1.25


def matrix_layout(n: int, small: int, axes: Mapping[str, int],
                  home: tuple[str, ...] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How n matrices (whose smaller side is ``small`` long) are spread over the mesh ``axes``
    ({name: size}): (batch axes, split axes), a partition of the axes.

    The matrices go over the batch axes (n padded to a multiple of their size), each matrix's
    smaller side over the split axes, so that every device takes a share and none repeats another's
    work. Chosen to minimise the matrices per device (a split matrix counting as 1/split, times
    ``SPLIT_PENALTY``); ties go to fewer split devices. ``home``: the axes that already split the
    smaller side where the matrices come from; the side must divide into the split and home axes
    together (``_Exchange`` gives each its own piece of the side).
    """
    names = [a for a, k in axes.items() if k > 1]
    total = math.prod(axes[a] for a in names)
    best = None
    for r in range(len(names), -1, -1):
        for batch in itertools.combinations(names, r):
            d_b = math.prod(axes[a] for a in batch)
            d_s = total // d_b
            split = tuple(a for a in names if a not in batch)
            if small % math.prod(axes[a] for a in set(split) | (set(home) & set(names))):
                continue
            cost = math.ceil(n / d_b) / d_s * (SPLIT_PENALTY if d_s > 1 else 1.0)
            if best is None or (cost, d_s) < best[0]:
                best = ((cost, d_s), batch, split)
    return best[1], best[2]


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _home_spec(lead: tuple[str, ...], rows: tuple[str, ...], cols: tuple[str, ...]) -> PartitionSpec:
    """The layout of a stack [P, n, rows, cols] as its leaves lay it out: P over the lead axes."""
    return PartitionSpec(_entry(lead), None, _entry(rows), _entry(cols))


class _Exchange:
    """The move of a stack [p, N, rows, cols] between the layout its matrices come in (``home``:
    dim 0 over the lead axes, N whole, rows and cols over some axes) and the spread one (N over the
    ``batch`` axes, the smaller side over the ``split`` axes), as explicit collectives in a
    ``shard_map``: one all-to-all per mesh axis that moves, a local slice per axis that the home
    layout copies. (Left to XLA's partitioner, a move of two axes from the matrices' sides to N
    became an all-gather of the whole stack on every device: 70 GiB a chip for V4-Flash on v5p-256.)

    Each of N, rows and cols is cut into one piece per mesh axis that is on it in either layout, in
    the home order, then the rest: an axis moves from its piece of one dimension to its piece of
    another, whatever the others do. At the spread end the pieces of a side are put in the order
    (axes that stay, axes that arrive, axes that left, rest), so that the side is laid out as one
    contiguous block per device; that permutes each matrix's rows or columns, which Newton-Schulz
    commutes with (NS(P X Q) = P NS(X) Q for permutations P, Q; the norm does not change), and the
    way back undoes it.
    """

    def __init__(self, mesh, shape: tuple[int, int, int, int], lead: tuple[str, ...], home_rows: tuple[str, ...],
                 home_cols: tuple[str, ...], batch: tuple[str, ...], split: tuple[str, ...]):
        k = {a: mesh.shape[a] for a in mesh.axis_names}
        self.mesh = mesh
        _, _, size, cols = shape
        small = 2 if size <= cols else 3
        home = {1: (), 2: tuple(home_rows), 3: tuple(home_cols)}
        want = {1: tuple(batch), 2: split if small == 2 else (), 3: split if small == 3 else ()}
        if not set(home_rows + home_cols) <= set(batch + split):
            raise ValueError(f"the spread layout ({batch}, {split}) leaves out home axes {home_rows + home_cols}")
        # the block's pieces: dim 0 whole, then for each of dims 1..3 a piece per axis and the rest
        piece: dict[tuple[int, str], int] = {}
        self.home_pieces = [shape[0] // math.prod(k[a] for a in lead)]
        ends = [1]
        for d in (1, 2, 3):
            axes = home[d] + tuple(a for a in want[d] if a not in home[d])
            rest, left = divmod(shape[d], math.prod(k[a] for a in axes))
            if left:
                raise ValueError(f"dimension {d} of the stack {shape} does not divide over the axes {axes}")
            for a in axes:
                piece[(d, a)] = len(self.home_pieces)
                self.home_pieces.append(1 if a in home[d] else k[a])
            piece[(d, "")] = len(self.home_pieces)
            self.home_pieces.append(rest)
            ends.append(len(self.home_pieces))
        self._ends = tuple(ends)  # where each dimension's pieces end (the same at both ends)
        self.moves = []  # (axis, its piece at home or None where home copies it, its piece spread)
        moved = list(self.home_pieces)
        for d in (1, 2, 3):
            for a in want[d]:
                src = next((piece[(e, a)] for e in (2, 3) if a in home[e]), None)
                if src != piece[(d, a)]:
                    self.moves.append((a, src, piece[(d, a)]))
                    moved[piece[(d, a)]] = 1
                    if src is not None:
                        moved[src] = k[a]
        self.order, spec = [0], [_entry(lead)]  # spread end: each dim's pieces as (stay, arrive, leave, rest)
        for d in (1, 2, 3):
            stay = [a for a in home[d] if a in want[d]]
            arrive = [a for a in want[d] if a not in home[d]]
            leave = [a for a in home[d] if a not in want[d]]
            self.order += [piece[(d, a)] for a in stay + arrive + leave] + [piece[(d, "")]]
            spec.append(_entry(tuple(stay + arrive)))
        self.moved_pieces = [moved[i] for i in self.order]
        self.inverse = [self.order.index(i) for i in range(len(self.order))]
        self.home_spec = _home_spec(lead, home[2], home[3])
        self.spread_spec = PartitionSpec(*spec)

    def _block(self, pieces):
        """The 4 dimensions of a block cut into ``pieces``."""
        return [math.prod(pieces[i:j]) for i, j in zip((0,) + self._ends[:-1], self._ends)]

    def to_spread(self, x: jax.Array) -> jax.Array:
        """The stack [p, N, rows, cols] from the home layout to the spread one."""
        def body(b):
            b = b.reshape(self.home_pieces)
            for a, src, dst in self.moves:
                if src is None:  # home copies it over ``a``: keep this device's piece
                    b = jax.lax.dynamic_slice_in_dim(b, jax.lax.axis_index(a), 1, dst)
                else:
                    b = jax.lax.all_to_all(b, a, dst, src, tiled=True)
            return jnp.transpose(b, self.order).reshape(self._block(self.moved_pieces))

        return jax.shard_map(body, mesh=self.mesh, in_specs=self.home_spec, out_specs=self.spread_spec)(x)

    def to_home(self, y: jax.Array) -> jax.Array:
        """The inverse of ``to_spread``."""
        def body(b):
            b = jnp.transpose(b.reshape(self.moved_pieces), self.inverse)
            for a, src, dst in reversed(self.moves):
                if src is None:
                    b = jax.lax.all_gather(b, a, axis=dst, tiled=True)
                else:
                    b = jax.lax.all_to_all(b, a, src, dst, tiled=True)
            return b.reshape(self._block(self.home_pieces))

        # all_gather's result is typed as varying over its axis (jax 0.10 has no invariant form), so
        # the replication the home layout asks for is not checked; it holds by construction
        return jax.shard_map(body, mesh=self.mesh, in_specs=self.spread_spec, out_specs=self.home_spec,
                             check_vma=False)(y)


def orthogonalize_on_mesh(updates: list[jax.Array], blocks: list[RowBlocks | None], shardings: list, mesh,
                          *, rms_scale: float = 0.18, ns_dtype=F32, eps: float = 1e-7) -> list[jax.Array]:
    """``orthogonalize`` of every leaf, with the Newton-Schulz work spread over every device of ``mesh``
    (leaf i laid out as ``shardings[i]``, a NamedSharding; the results come back so).

    The independent matrices (leading indices and row blocks) of the leaves that share a matrix
    shape and a layout are pooled into one stack [P, n, rows, cols], P being the devices that split
    the leaves' leading axes (experts); everything up to here moves no data between devices. The n
    matrices of each of those P slices are then spread over the remaining devices, data replicas
    included, by ``matrix_layout``: whole matrices where there are enough of them, split along
    their smaller side where there are few. ``_Exchange`` moves the stack there and back with one
    all-to-all per mesh axis, and the stack is orthogonalised there (each matrix exactly as on one
    device, up to a permutation of its rows or columns that the way back undoes). Every reshape,
    concatenation and slice outside the exchange runs along axes no device splits.
    """
    mesh_axes = {a: k for a, k in mesh.shape.items() if k > 1}
    on_cpu = mesh.devices.flat[0].platform == "cpu"

    def after(x, previous):
        # XLA:CPU runs independent collectives in any order on each device, and devices that took
        # different orders wait for each other for ever (seen: one device in a group's all-to-all,
        # seven in another's all-gather). There each leaf's and each group's exchange waits for the
        # one before it.
        if not on_cpu or previous is None:
            return x
        return jax.lax.optimization_barrier((x, previous))[0]

    def constrain(x, spec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    groups: dict[tuple, list] = {}  # layout key -> [(leaf, run start, piece [P, n, size, cols])]
    leaves = []  # per leaf: (transposed shape, inverse permutation)
    previous = None
    for i, (u, b, sharding) in enumerate(zip(updates, blocks, shardings)):
        runs = _block_runs(u, b)
        u = after(u, previous)  # a leaf whose rows are gathered below exchanges data
        cols = u.shape[-1]
        spec = tuple(sharding.spec) + (None,) * (u.ndim - len(sharding.spec))
        lead, row_axes, col_axes = spec[:-2], _axes(spec[-2]), _axes(spec[-1])
        if row_axes and (len(runs) > 1 or runs[0][1] > 1):  # row blocks are cut from whole rows
            u = constrain(u, PartitionSpec(*lead, None, spec[-1]))
            row_axes = ()
        # leading axes split over devices first (in order), so that they become one major axis P
        split_dims = [d for d, e in enumerate(lead) if e is not None]
        order = split_dims + [d for d in range(len(lead)) if d not in split_dims] + [u.ndim - 2, u.ndim - 1]
        lead_axes = tuple(a for d in split_dims for a in _axes(lead[d]))
        p = math.prod(mesh.shape[a] for a in lead_axes)
        ut = jnp.transpose(u, order) if order != list(range(u.ndim)) else u
        leaves.append((ut.shape, [order.index(d) for d in range(u.ndim)]))
        start = 0
        for size, count in runs:
            piece = ut[..., start:start + size * count, :].reshape(p, -1, size, cols)
            key = (size, cols, u.dtype, lead_axes, row_axes, col_axes)
            previous = constrain(piece, _home_spec(lead_axes, row_axes, col_axes))
            groups.setdefault(key, []).append((i, start, previous))
            start += size * count

    results: list[dict[int, jax.Array]] = [{} for _ in updates]
    for (size, cols, dtype, lead_axes, row_axes, col_axes), members in groups.items():
        home = _home_spec(lead_axes, row_axes, col_axes)
        stack = jnp.concatenate([m[2] for m in members], axis=1) if len(members) > 1 else members[0][2]
        stack = after(stack, previous)
        p, n = stack.shape[:2]
        rest = {a: k for a, k in mesh_axes.items() if a not in lead_axes}
        batch, split = matrix_layout(n, min(size, cols), rest, row_axes if size <= cols else col_axes)
        d_b = math.prod(mesh.shape[a] for a in batch)
        padded = -(-n // d_b) * d_b
        if padded > n:  # zero matrices stay zero
            stack = jnp.pad(stack, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
        stack = constrain(stack, home)
        exchange = _Exchange(mesh, stack.shape, lead_axes, row_axes, col_axes, batch, split)
        stack = exchange.to_spread(stack)
        o = hybrid_newton_schulz(stack, ns_dtype=ns_dtype, eps=eps,
                                 constrain=lambda x, spec=exchange.spread_spec: constrain(x, spec))
        o = constrain((o * (math.sqrt(max(size, cols)) * rms_scale)).astype(dtype), exchange.spread_spec)
        o = constrain(exchange.to_home(o), home)[:, :n]
        previous = o
        offset = 0
        for i, start, piece in members:
            k = piece.shape[1]
            results[i][start] = o[:, offset:offset + k]
            offset += k

    out = []
    for (shape, inverse), parts, sharding in zip(leaves, results, shardings):
        runs = [parts[k].reshape(shape[:-2] + (-1, shape[-1])) for k in sorted(parts)]
        leaf = jnp.concatenate(runs, axis=-2) if len(runs) > 1 else runs[0]
        leaf = jnp.transpose(leaf, inverse) if inverse != list(range(len(inverse))) else leaf
        out.append(jax.lax.with_sharding_constraint(after(leaf, previous), sharding))
        previous = out[-1]
    return out


# --------------------------------------------------------------------------------------------------
# Muon


RowBlocksSpec = Mapping[str, RowBlocks] | Callable[[Any], Mapping[str, RowBlocks]] | None
ShardingsSpec = Mapping[str, NamedSharding] | Callable[[Any], Mapping[str, NamedSharding]] | None


def scale_by_hybrid_newton_schulz(rms_scale: float = 0.18, *, ns_dtype=F32, eps: float = 1e-7,
                                  row_blocks: RowBlocksSpec = None, mesh=None,
                                  shardings: ShardingsSpec = None) -> optax.GradientTransformation:
    """Stateless: replace each update leaf by ``orthogonalize(leaf, blocks)``.

    row_blocks: None (every leaf one matrix per leading index), or a mapping from
    ``jax.tree_util.keystr(path)`` to row-block sizes (leaves not in it are one matrix), or a
    callable ``updates -> mapping``.
    mesh: a ``jax.sharding.Mesh`` of more than one device spreads the work over all of them
    (``orthogonalize_on_mesh``); the results get the shardings of ``shardings`` (a mapping from
    keystr(path) to NamedSharding, or a callable ``updates -> mapping``; leaves not in it are
    replicated). Same numbers either way.
    """

    def update_fn(updates, state, params=None):
        del params
        table = row_blocks(updates) if callable(row_blocks) else (row_blocks or {})
        if mesh is None or mesh.size == 1:
            out = jax.tree_util.tree_map_with_path(
                lambda path, u: orthogonalize(u, table.get(jax.tree_util.keystr(path)), rms_scale=rms_scale,
                                              ns_dtype=ns_dtype, eps=eps), updates)
            return out, state
        layouts = shardings(updates) if callable(shardings) else (shardings or {})
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        keys = [jax.tree_util.keystr(path) for path, _ in flat]
        replicated = NamedSharding(mesh, PartitionSpec())
        out = orthogonalize_on_mesh([u for _, u in flat], [table.get(k) for k in keys],
                                    [layouts.get(k, replicated) for k in keys], mesh, rms_scale=rms_scale,
                                    ns_dtype=ns_dtype, eps=eps)
        return treedef.unflatten(out), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.95, weight_decay: float = 0.1,
         rms_scale: float = 0.18, *, ns_dtype=F32, ns_eps: float = 1e-7, row_blocks: RowBlocksSpec = None,
         mu_dtype=None, weight_decay_mask=None, mesh=None, shardings: ShardingsSpec = None
         ) -> optax.GradientTransformation:
    """DeepSeek-V4 Muon (Algorithm 1, see the module docstring) for a pytree of matrices.

    learning_rate: eta, a scalar or an optax schedule. momentum: mu. weight_decay: lambda
    (decoupled: W(1 - eta*lambda)). rms_scale: gamma. ns_dtype: fp32 (default) or bf16 matmuls in
    Newton-Schulz. row_blocks, mesh, shardings: see ``scale_by_hybrid_newton_schulz``. mu_dtype: dtype of the
    momentum buffer (default: the parameter's). Every leaf must have rank >= 2; leading axes are
    batches of independent matrices. State: a tuple of optax NamedTuples; the momentum M is
    ``state[0].trace``.
    """
    return optax.chain(
        optax.trace(decay=momentum, nesterov=True, accumulator_dtype=mu_dtype),
        scale_by_hybrid_newton_schulz(rms_scale, ns_dtype=ns_dtype, eps=ns_eps, row_blocks=row_blocks, mesh=mesh,
                                      shardings=shardings),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# Labels and row blocks, from the parameters' declarations (v4jax.params)


def param_labels(params, config) -> Any:
    """The optimiser label of every leaf (same tree structure, str leaves): one of ``LABELS``, as
    declared. Accepts arrays, ShapeDtypeStructs (``model.param_specs``) and gradient trees, in
    either parameter layout."""
    return jax.tree.map(lambda info: info.optimizer, tree_infos(config, params))


def muon_row_blocks(params, config, *, split_mhc_fn: bool = True) -> dict[str, RowBlocks]:
    """Row blocks of every fused Muon leaf, keyed by ``jax.tree_util.keystr(path)``: the declared
    ``row_blocks`` (compressor wkv/wgate with 2c rows, attn.wo_a with g > 1 groups, mHC fn with
    (2+n)n rows unless not ``split_mhc_fn``)."""
    out: dict[str, RowBlocks] = {}
    for path, info in jax.tree_util.tree_flatten_with_path(tree_infos(config, params))[0]:
        if info.row_blocks is None or (not split_mhc_fn and path_keys(path)[-1] == "fn"):
            continue
        out[jax.tree_util.keystr(path)] = info.row_blocks
    return out


# --------------------------------------------------------------------------------------------------
# The combined optimiser


def freeze() -> optax.GradientTransformation:
    """Updates of exactly zero (in the parameter's dtype when params are given; a float0 gradient of
    an integer leaf becomes int32 zeros), so ``optax.apply_updates`` leaves the leaf unchanged."""

    def zeros(u, p):
        if p is not None:
            return jnp.zeros(jnp.shape(p), jnp.asarray(p).dtype)
        dt = jnp.int32 if u.dtype == jax.dtypes.float0 else u.dtype
        return jnp.zeros(u.shape, dt)

    def update_fn(updates, state, params=None):
        if params is None:
            return jax.tree.map(lambda u: zeros(u, None), updates), state
        return jax.tree.map(zeros, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def v4_optimizer(learning_rate: optax.ScalarOrSchedule, config, *, muon_momentum: float = 0.95,
                 muon_weight_decay: float = 0.1, rms_scale: float = 0.18, adam_b1: float = 0.9,
                 adam_b2: float = 0.95, adam_eps: float = 1e-20, adam_weight_decay: float = 0.1,
                 adam_decay_all: bool = False, ns_dtype=F32, split_mhc_fn: bool = True,
                 mu_dtype=None, table_lr_multiplier: float = 5.0, mesh=None) -> optax.GradientTransformation:
    """Muon + AdamW over a v4jax parameter tree of ``config`` (either layout), split by ``param_labels``.

    learning_rate: a scalar or an optax schedule, shared by both optimisers (spec §4).
    Muon: ``muon(learning_rate, muon_momentum, muon_weight_decay, rms_scale)`` with the row blocks of
    ``muon_row_blocks``. AdamW: ``optax.adamw(learning_rate, adam_b1, adam_b2, adam_eps,
    weight_decay=adam_weight_decay)`` for "adamw" leaves and the same with weight decay 0 for
    "adamw_no_decay" leaves (unless ``adam_decay_all``). "frozen" leaves get zero updates. "table"
    leaves (Engram's n-gram tables) get the same AdamW without weight decay at ``table_lr_multiplier``
    times the learning rate (the Engram paper's 5x).
    ns_dtype: Newton-Schulz matmul operand dtype (fp32 default, bf16 optional). mu_dtype: dtype of
    the Muon momentum and Adam first moment (default: the parameter's; pass fp32 for bf16 params).
    mesh: the device mesh the parameters live on (``v4jax.parallel``'s rules); Muon's Newton-Schulz
    work is then spread over all its devices (``orthogonalize_on_mesh``), with the same result.
    Pass params to ``update`` (weight decay needs them). State: ``optax.PartitionState``.
    """

    table_lr = ((lambda step: table_lr_multiplier * learning_rate(step)) if callable(learning_rate)
                else table_lr_multiplier * learning_rate)

    def build(tree) -> optax.GradientTransformation:
        blocks = muon_row_blocks(tree, config, split_mhc_fn=split_mhc_fn)
        labels = param_labels(tree, config)

        def adam(lr, wd):
            return optax.adamw(lr, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=wd, mu_dtype=mu_dtype)

        layouts = None
        if mesh is not None and mesh.size > 1:
            layouts = {jax.tree_util.keystr(path): sh for path, sh in
                       jax.tree_util.tree_flatten_with_path(param_shardings(tree, mesh, config))[0]}
        groups = {MUON: muon(learning_rate, muon_momentum, muon_weight_decay, rms_scale, ns_dtype=ns_dtype,
                             row_blocks=blocks, mu_dtype=mu_dtype, mesh=mesh, shardings=layouts),
                  ADAMW: adam(learning_rate, adam_weight_decay),
                  ADAMW_NO_DECAY: adam(learning_rate, adam_weight_decay if adam_decay_all else 0.0),
                  FROZEN: freeze()}
        if TABLE in jax.tree.leaves(labels):  # only with Engram, so other states keep their structure
            groups[TABLE] = adam(table_lr, 0.0)
        return optax.partition(groups, labels)

    # Labels and row blocks are looked up by path, at trace time, on the tree being updated
    # (updates have the params' structure and shapes).
    def init_fn(params):
        return build(params).init(params)

    def update_fn(updates, state, params=None):
        return build(updates).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["HYBRID_NS_COEFFS", "LABELS", "MUON", "ADAMW", "ADAMW_NO_DECAY", "FROZEN", "hybrid_newton_schulz",
           "orthogonalize", "matrix_layout", "orthogonalize_on_mesh", "scale_by_hybrid_newton_schulz", "muon",
           "param_labels", "muon_row_blocks", "freeze",
           "v4_optimizer"]
