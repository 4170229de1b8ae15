"""Mixture of experts: sqrt-softplus router, hash routing in the first layers, clamped SwiGLU (spec §2.7).

Shape letters: t tokens (batch and sequence flattened), d model, e experts, k experts per token,
f expert hidden size.

    scores = sqrt(softplus(x @ gate^T))                      # fp32, [t, e]
    idx    = tid2eid[token]            (hash layers)         # [t, k]
           = top_k(scores + bias)      (other layers; the bias only affects selection)
    w      = scores[idx] / sum(scores[idx]) * routed_scaling_factor
    y      = sum_k  w2_e( w_k * silu(min(w1_e x, L)) * clip(w3_e x, -L, L) )  +  shared(x)

The routing weight multiplies the expert hidden state before w2, as the official code does.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from v4jax import devices
from v4jax.config import ModelConfig
from v4jax.grouped_matmul_kernel import group_outer
from v4jax.layers import F32, linear, linear_f32
from v4jax.parallel import expert_axes, token_axes
from v4jax.params import FROZEN, Init, ParamInfo, declare, matrix, pure
from v4jax.quant import BlockScaled, Quantized, activation, weight_values


def router_scores(x: jax.Array, gate_weight: jax.Array) -> jax.Array:
    """x [..., d] -> sqrt(softplus(logits)) [..., e] in fp32 (torch's softplus, threshold 20)."""
    logits = linear_f32(x, gate_weight)
    return jnp.sqrt(jnp.where(logits > 20.0, logits, jax.nn.softplus(logits)))


def route(x: jax.Array, gate: dict, token_ids: jax.Array, config: ModelConfig):
    """Pick experts and weights. x [t, d], token_ids [t] -> (idx [t, k] int32, weights [t, k] fp32, scores [t, e])."""
    scores = router_scores(x, gate["weight"])
    if "tid2eid" in gate:
        idx = gate["tid2eid"][token_ids].astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + gate["bias"].astype(F32), config.num_experts_per_tok)
    # scores[t, idx[t, j]] as a one-hot select-and-sum: its gradient is elementwise, where
    # take_along_axis's is a scatter-add (9 ms a step on an H200 at 16K tokens).
    picked = idx[..., None] == jnp.arange(scores.shape[-1], dtype=idx.dtype)
    w = jnp.sum(jnp.where(picked, scores[..., None, :], 0.0), axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True) * config.routed_scaling_factor
    return idx, w, scores


@functools.partial(jax.checkpoint, static_argnums=(3,))
def swiglu(gate: jax.Array, up: jax.Array, scale: jax.Array | None, limit: float) -> jax.Array:
    """Clamped SwiGLU, computed in fp32 and returned in gate's dtype:
    scale * silu(min(gate, L)) * clip(up, -L, L), with scale [...] a per-row weight or None.

    Checkpointed, so the backward keeps only the inputs (the compute-dtype projections) and
    recomputes the rest in its own fusion; autodiff of it kept about a dozen fp32 [rows, f] arrays
    per layer (on an H200, 10 GiB of residuals a step for V4-Flash-8l).
    """
    hidden = jax.nn.silu(jnp.minimum(gate.astype(F32), limit)) * jnp.clip(up.astype(F32), -limit, limit)
    if scale is not None:
        hidden = hidden * scale[..., None]
    return hidden.astype(gate.dtype)


def shared_expert(x: jax.Array, p: dict, limit: float) -> jax.Array:
    """The always-on expert: same clamped SwiGLU, no routing weight. x [..., d] -> [..., d] fp32."""
    return linear(swiglu(linear(x, p["w1"]), linear(x, p["w3"]), None, limit), p["w2"]).astype(F32)


# The grouped matmul's three products as ragged dot dimension numbers (jax.lax.ragged_dot_general).
# The weights keep the checkpoint's [out, in] layout, w [g, n, k], so neither they nor their fp32
# gradients are transposed in memory, and the weight gradient comes out in the parameter's layout.
FWD = jax.lax.RaggedDotDimensionNumbers((([1], [2]), ([], [])), [0], [0])  # x [m, k] . w [g, n, k] -> [m, n]
DLHS = jax.lax.RaggedDotDimensionNumbers((([1], [1]), ([], [])), [0], [0])  # dy [m, n] . w [g, n, k] -> [m, k]
DRHS = jax.lax.RaggedDotDimensionNumbers((([0], [0]), ([], [])), [0], [])  # dy [m, n] . x [m, k] -> [g, n, k]


def _import_tokamax():
    """tokamax where it is installed, imported with this module: its config options are jax user
    contexts, which join every jit cache key, so importing it at the first traced MoE (as v4jax did)
    changed the key of everything jitted before and compiled each once more. An 8K prefill of
    bench-flash-8l on an H100 took 30 s on its second call, compiling again (docs/benchmarks.md,
    Part 12). A broken install counts as absent."""
    if importlib.util.find_spec("tokamax") is None:
        return None
    try:
        import tokamax  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        return None
    return tokamax


_TOKAMAX = _import_tokamax()


def tokamax_installed() -> bool:
    return _TOKAMAX is not None


def tokamax_kernels(acc: devices.Accelerator | None = None) -> tuple[str, str, str]:
    """The kernel of each product (forward, input gradient, weight gradient) of the ``tokamax``
    backend on ``acc`` (default: this process's accelerator; see ``v4jax.devices``).

    tokamax's Mosaic kernels take the two products with ragged rows on a TPU and on the GPUs it has
    kernels for (``v4jax.devices.tokamax_mosaic``), XLA's ragged product on other GPUs. The weight
    gradient is never tokamax's: with these dimension numbers (DRHS) tokamax 0.0.17's Mosaic kernel
    gave a wrong weight gradient on an H200 (docs/benchmarks.md, Parts 4 and 5: the same tree with
    only that product swapped checks out). It is our Pallas Triton kernel where Pallas Triton runs
    (v4jax.grouped_matmul_kernel; faster than tokamax's on an H200, docs/benchmarks.md), XLA's
    ragged product elsewhere. tokamax's Triton kernels need jax-triton, which the GPU image lacks.
    """
    acc = acc or devices.current()
    rows = "mosaic" if acc.platform == "tpu" or devices.tokamax_mosaic(acc) else "xla"
    return rows, rows, "pallas" if devices.pallas_triton(acc) else "xla"


def resolve_backend(backend: str, acc: devices.Accelerator | None = None) -> str:
    """``auto``: tokamax's kernels where tokamax is installed and has its Mosaic kernels for ``acc``
    (a TPU; an NVIDIA GPU of compute capability 9.x or 10.x), else jax.lax.ragged_dot."""
    if backend != "auto":
        return backend
    acc = acc or devices.current()
    if tokamax_installed() and (acc.platform == "tpu" or devices.tokamax_mosaic(acc)):
        return "tokamax"
    return "ragged_dot"


# tokamax 0.0.17's Mosaic TPU kernel raises NotImplementedError unless the two minor dimensions of
# both operands are at least this (tiny.yaml's d = 64 and f = 64 are not).
MOSAIC_TPU_MIN_DIM = 128
# Its Mosaic GPU (sm90) kernel takes bf16 x bf16 or f16 x f16 only (train.dtype float32 is neither).
MOSAIC_GPU_DTYPES = (jnp.bfloat16, jnp.float16)


def product_kernel(kernel: str, a, b, acc: devices.Accelerator | None = None) -> str:
    """The kernel that takes the product of operands ``a`` and ``b`` (arrays or ShapeDtypeStructs):
    ``kernel``, except "mosaic" where tokamax's Mosaic kernel does not implement it, which takes
    XLA's ragged product ("xla"): on a TPU a minor dimension under ``MOSAIC_TPU_MIN_DIM``, on a GPU
    operands outside ``MOSAIC_GPU_DTYPES`` or of two dtypes."""
    if kernel != "mosaic":
        return kernel
    if (acc or devices.current()).platform == "tpu":
        return "xla" if min(a.shape[-2:] + b.shape[-2:]) < MOSAIC_TPU_MIN_DIM else kernel
    return kernel if a.dtype == b.dtype and a.dtype in MOSAIC_GPU_DTYPES else "xla"


def ragged_product(a: jax.Array, b: jax.Array, sizes: jax.Array, dims, kernel: str) -> jax.Array:
    """One product of the grouped matmul (``dims``: FWD, DLHS or DRHS) with ``kernel``: "xla"
    (jax.lax.ragged_dot_general), "pallas" (``group_outer``; DRHS only) or a tokamax implementation
    ("mosaic", "triton"; ``product_kernel`` sends what the Mosaic kernels do not take to "xla").
    Output in a's dtype."""
    kernel = product_kernel(kernel, a, b)
    if kernel == "xla":
        return jax.lax.ragged_dot_general(a, b, sizes, dims, preferred_element_type=F32).astype(a.dtype)
    if kernel == "pallas":
        if dims != DRHS:
            raise ValueError("the pallas grouped-matmul kernel computes the weight gradient (DRHS) only")
        return group_outer(a, b, sizes, out_dtype=a.dtype)
    return _TOKAMAX.ragged_dot_general(a, b, sizes, dims, preferred_element_type=a.dtype, implementation=kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def kernel_grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, kernels: tuple[str, str, str]):
    """x [m, k] (rows sorted by group) times w [g, n, k] (stored [out, in]), transposed -> [m, n],
    each product by its own kernel: ``kernels`` = (forward, input gradient, weight gradient), see
    ``ragged_product``."""
    return ragged_product(x, w, sizes, FWD, kernels[0])


def _kernel_gmm_fwd(x, w, sizes, kernels):
    return kernel_grouped_matmul(x, w, sizes, kernels), (x, w, sizes)


def _kernel_gmm_bwd(kernels, res, dy):
    x, w, sizes = res
    dy = dy.astype(x.dtype)
    dx = ragged_product(dy, w, sizes, DLHS, kernels[1])
    dw = ragged_product(dy, x, sizes, DRHS, kernels[2]).astype(w.dtype)
    return dx, dw, None


kernel_grouped_matmul.defvjp(_kernel_gmm_fwd, _kernel_gmm_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, backend: str = "ragged_dot",
                   capacity_factor: float = 2.0, every_row_grouped: bool = False) -> jax.Array:
    """Rows of x [m, k], sorted by group, times their group's matrix w [g, n, k] (stored [out, in], as
    the checkpoint has it), transposed -> [m, n] in x's dtype.

    ``sizes`` [g] counts the rows of each group (rows past their sum give zeros;
    ``every_row_grouped``: the caller guarantees sum(sizes) = m, so there are none). Backends:
    ``ragged_dot`` (jax.lax.ragged_dot and its autodiff, the reference), ``tokamax`` (tokamax's
    kernels, one per product: ``tokamax_kernels``; GPU/TPU), ``auto`` (``resolve_backend``) and
    ``padded`` (scatter into [g, cap, k] with cap = ceil(capacity_factor * m / g), one batched
    matmul, gather back; rows past a group's capacity give zeros: it drops tokens).
    """
    backend = resolve_backend(backend)
    if backend == "ragged_dot":
        return jax.lax.ragged_dot_general(x, w, sizes, FWD)
    if backend == "tokamax":
        if not tokamax_installed():
            raise ImportError("parallel.moe_backend='tokamax' needs the tokamax package (Python >= 3.12, "
                              "GPU or TPU): pip install tokamax, or use auto / ragged_dot / padded")
        gmm = functools.partial(kernel_grouped_matmul, kernels=tokamax_kernels())
        return gmm(x, w, sizes) if every_row_grouped else zero_unvisited_rows(gmm, x, w, sizes)
    if backend != "padded":
        raise ValueError(f"unknown grouped-matmul backend {backend!r}")
    m, g = x.shape[0], w.shape[0]
    cap = capacity(m, g, capacity_factor)
    starts = jnp.cumsum(sizes) - sizes
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m), side="right")  # group of each row
    offset = jnp.arange(m) - starts[jnp.minimum(group, g - 1)]
    ok = (group < g) & (offset < cap)
    slot = jnp.where(ok, group * cap + offset, g * cap)  # g * cap: dropped
    padded = jnp.zeros((g * cap + 1, x.shape[1]), x.dtype).at[slot].set(x)[:-1].reshape(g, cap, -1)
    out = jnp.einsum("gck,gnk->gcn", padded, w.astype(x.dtype)).reshape(g * cap, -1)
    return jnp.where(ok[:, None], out[jnp.minimum(slot, g * cap - 1)], 0).astype(out.dtype)


def capacity(rows: int, groups: int, capacity_factor: float) -> int:
    """Slots per group of a fixed-capacity buffer: ceil(capacity_factor * rows / groups), at least 1
    (the padded matmul's per-expert capacity, the capacity dispatch's per-destination one)."""
    return max(1, -(-int(capacity_factor * rows) // groups))


def zero_unvisited_rows(matmul, x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """``matmul(x, w, sizes)`` with the rows past sum(sizes) zeroed on the way in and out.

    tokamax's kernels leave those output rows unwritten (``zero_initialize`` defaults to False), and
    the capacity dispatch always has such rows (its empty slots). Whatever they hold would otherwise
    reach the weight gradients as 0 * NaN. Masking the input too zeroes them in the VJP as well.
    """
    # The row masks are checkpointed so the backward recomputes them from ``sizes``: otherwise it
    # kept each mask as a residual, broadcast to the full [m, k] shape.
    mask = jax.checkpoint(lambda a, sizes: jnp.where((jnp.arange(a.shape[0]) < jnp.sum(sizes))[:, None], a, 0))
    return mask(matmul(mask(x, sizes), w, sizes), sizes)


def expert_ffn(xs: jax.Array, sizes: jax.Array, weights: jax.Array, p: dict, limit: float, backend: str,
               capacity_factor: float = 2.0, every_row_grouped: bool = False) -> tuple[jax.Array, jax.Array]:
    """The routed SwiGLU on rows grouped by expert. xs [m, d] sorted by expert, sizes [e],
    weights [m] routing weight per row (applied before w2); ``every_row_grouped`` as in
    ``grouped_matmul``. Returns (ys [m, d] in xs's dtype, dropped): the rows that got no output,
    those past an expert's capacity in the ``padded`` backend (0 otherwise).

    Where the weights are converted on the way (fp32 master weights cast to the compute dtype,
    and ``v4jax.quant.Quantized`` ones quantised in their format with both matmuls' inputs in
    FP8: training), w1 and w3 run as one grouped matmul on [e, 2f, d]: one pass over the rows, and
    the concatenation fuses with the conversion. Weights already in the compute dtype (a bf16
    model decoding) take two matmuls instead: concatenating them would copy every expert's w1 and
    w3 each step (on an H100 at batch 32, 1.4 ms of a 4.7 ms decode step; docs/benchmarks.md Part
    12). So do ``v4jax.quant.BlockScaled`` ones (kept as stored, decoding): on an H100 their
    concatenation did not fuse with the decode, and copied every expert again (1.4 ms a step).
    """
    f = p["w1"].shape[1]
    quantized = isinstance(p["w1"], Quantized)
    w1, w3, w2 = (weight_values(p[k], xs.dtype) for k in ("w1", "w3", "w2"))
    mm = lambda a, w: grouped_matmul(a, w, sizes, backend, capacity_factor, every_row_grouped)  # noqa: E731
    xin = activation(xs) if quantized else xs
    if isinstance(p["w1"], BlockScaled) or (isinstance(p["w1"], jax.Array) and p["w1"].dtype == xs.dtype):
        gate, up = mm(xin, w1), mm(xin, w3)
    else:
        gate_up = mm(xin, jnp.concatenate([w1, w3], axis=1))  # [e, 2f, d]
        gate, up = gate_up[:, :f], gate_up[:, f:]
    hidden = swiglu(gate, up, weights, limit)
    hidden = activation(hidden) if quantized else hidden
    dropped = jnp.zeros((), jnp.int32)
    if backend == "padded":
        cap = capacity(xs.shape[0], sizes.shape[0], capacity_factor)
        dropped = jnp.sum(jnp.maximum(sizes - cap, 0)).astype(jnp.int32)
    return mm(hidden, w2), dropped


# Token copies to expert order and back. Both directions are gathers, forward and backward: a
# permutation's transpose is its inverse, and the k copies of a token are summed as a reshape.
# Each is the other's gradient (custom VJPs); autodiff of either gather would scatter-add instead.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    """x [t, d] -> the t*k token copies in expert order, xs [t*k, d]: xs[i] = x[order[i] // k].
    ``order`` sorts the flattened (token, choice) pairs by expert; ``inverse`` is its inverse."""
    return x[order // k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def combine(ys: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    """The transpose of ``dispatch``: ys [t*k, d] in expert order -> per-token sums [t, d] in fp32."""
    t = ys.shape[0] // k
    return jnp.sum(ys[inverse].reshape(t, k, -1).astype(F32), axis=1)


def _dispatch_fwd(x, order, inverse, k):
    return dispatch(x, order, inverse, k), (order, inverse)


def _dispatch_bwd(k, res, g):
    order, inverse = res
    return combine(g, order, inverse, k).astype(g.dtype), None, None


def _combine_fwd(ys, order, inverse, k):
    return combine(ys, order, inverse, k), (order, inverse, jnp.zeros((0,), ys.dtype))


def _combine_bwd(k, res, g):
    order, inverse, like = res
    return dispatch(g, order, inverse, k).astype(like.dtype), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)
combine.defvjp(_combine_fwd, _combine_bwd)


# Fewer (token, choice) pairs than experts (decoding a few rows) take ``gathered_experts``, which
# reads only the chosen experts' weights but copies them first. bench/decode.py --grouped-decode
# turns this off to time the grouped matmul (which skips empty groups) in its place.
GATHER_FEW_PAIRS = True


def routed_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, p: dict, limit: float,
                   backend: str = "ragged_dot", capacity_factor: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """Single-device path: sort token copies by expert, one grouped matmul per projection.

    x [t, d]; idx, weights [t, k]; p {w1 [e, f, d], w3 [e, f, d], w2 [e, d, f]}. Returns (y [t, d]
    fp32, dropped (token, choice) pairs: the ``padded`` backend's overflow).
    """
    if GATHER_FEW_PAIRS and idx.size < p["w1"].shape[0]:
        return gathered_experts(x, idx, weights, p, limit), jnp.zeros((), jnp.int32)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    sizes = jnp.bincount(flat, length=p["w1"].shape[0]).astype(jnp.int32)
    expert_weights = dispatch(weights.reshape(-1, 1), order, inverse, 1)[:, 0]
    # every (token, choice) pair is a row of its expert: no rows past the groups' total
    ys, dropped = expert_ffn(dispatch(x, order, inverse, k), sizes, expert_weights, p, limit, backend,
                             capacity_factor, every_row_grouped=True)
    return combine(ys, order, inverse, k), dropped


def gathered_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, p: dict, limit: float) -> jax.Array:
    """Each (token, choice) pair through its own expert's weights, gathered: x [t, d], idx and
    weights [t, k] -> y [t, d] fp32. ``routed_experts`` takes this path for fewer pairs than experts
    (decoding a few rows), where it reads t*k experts' weights and a grouped matmul reads all e
    (``BlockScaled`` ones are gathered as stored and decoded after). Same products as
    ``expert_ffn``, whichever backend is set."""
    quantized = isinstance(p["w1"], Quantized)
    take = lambda w: weight_values(jax.tree.map(lambda a: a[idx], w), x.dtype)  # noqa: E731  [t, k, ...]
    xin = activation(x) if quantized else x
    gate, up = (jnp.einsum("td,tkfd->tkf", xin, take(p[w]), preferred_element_type=F32).astype(x.dtype)
                for w in ("w1", "w3"))
    hidden = swiglu(gate, up, weights, limit)
    hidden = activation(hidden) if quantized else hidden
    # Each pair's product first, then the sum over its k experts: written as one contraction over
    # (k, f), XLA on an H100 made it a multiply writing a [k, f, d] fp32 buffer and a reduction of
    # it (at batch 1 the largest kernel of a decode step, 0.3 of 2.2 ms); per pair it is a
    # reduction over f, w2's minor axis, in one fusion with the gather, as w1's and w3's are.
    return jnp.einsum("tkf,tkdf->tkd", hidden, take(p["w2"]), preferred_element_type=F32).sum(axis=1)


def routed_experts_per_shard(x, idx, weights, p, limit, mesh, backend="ragged_dot", capacity_factor=2.0,
                             valid=None):
    """Every device runs its own tokens through all the experts (a mesh without an ``expert`` axis).

    Tokens are split over the batch axes and ``context`` in a shard_map; the expert weights enter
    whole (gathered over ``fsdp`` like any weight). Left to XLA, the grouped matmul's sort of all
    tokens by expert was not partitioned: every device ran every token. ``valid`` is not needed
    (padding rows have routing weight 0 and add nothing). Returns (y [t, d] fp32, dropped).
    """
    axes = token_axes(mesh)
    tok = P(axes, None)

    def local(x, idx, weights, p):
        y, dropped = routed_experts(x, idx, weights, p, limit, backend, capacity_factor)
        return y, jax.lax.psum(dropped, axes)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, P()), out_specs=(tok, P()), axis_names=set(axes),
                       check_vma=False)
    return fn(x, idx, weights, p)


def routed_experts_all_to_all(x, idx, weights, p, limit, mesh, backend="ragged_dot", capacity_factor=2.0,
                              valid=None, ep=("expert",)):
    """Expert parallelism over the mesh axes ``ep`` with a fixed-capacity all_to_all.

    Tokens are split over the batch axes (data, fsdp, expert) and ``context``; experts over the
    axes ``ep`` (``expert``, and ``context`` when the experts are folded over it). Each device sends
    every (token, choice) to the device holding its expert, at most C = ceil(capacity_factor *
    t_local * k / n_ep) rows per destination (the rest are dropped and counted); the receiver runs
    its experts and sends the results back, where they are summed per token. ``valid`` [t] bool
    (default: all) marks padding rows (False), which send nothing and get zeros.
    Returns (y [t, d] fp32, dropped: number of dropped (token, choice) pairs over all devices, at
    the dispatch or, with the ``padded`` backend, past an expert's capacity on the receiver).
    """

    n_ep = int(np.prod([mesh.shape[a] for a in ep]))
    batch_axes = token_axes(mesh)
    n_tok = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    e_local = p["w1"].shape[0] // n_ep
    t_local = x.shape[0] // n_tok
    k = idx.shape[1]
    cap = capacity(t_local * k, n_ep, capacity_factor)
    tok = P(batch_axes or None, None)
    exp = P(ep, None, None)

    def local(x, idx, weights, valid, w1, w3, w2):
        d = x.shape[1]
        flat_e, flat_w = idx.reshape(-1), weights.reshape(-1)
        real = jnp.repeat(valid, k)  # [t*k]: the pair belongs to a real token
        dest, local_e = flat_e // e_local, flat_e % e_local
        onehot = jax.nn.one_hot(dest, n_ep, dtype=jnp.int32) * real[:, None]
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # rank within its destination
        keep = (pos < cap) & real
        slot = jnp.where(keep, dest * cap + pos, n_ep * cap)
        rows = jnp.arange(flat_e.shape[0]) // k
        send_x = jnp.zeros((n_ep * cap + 1, d), x.dtype).at[slot].set(x[rows])[:-1]
        send_e = jnp.full((n_ep * cap + 1,), e_local, jnp.int32).at[slot].set(local_e)[:-1]
        send_w = jnp.zeros((n_ep * cap + 1,), F32).at[slot].set(flat_w)[:-1]
        a2a = lambda v: jax.lax.all_to_all(v.reshape((n_ep, cap) + v.shape[1:]), ep, 0, 0,  # noqa: E731
                                           tiled=True).reshape(v.shape)
        recv_x, recv_e, recv_w = a2a(send_x), a2a(send_e), a2a(send_w)
        order = jnp.argsort(recv_e, stable=True)  # empty slots (id e_local) sort last
        sizes = jnp.bincount(recv_e, length=e_local + 1)[:e_local].astype(jnp.int32)
        ys, overflow = expert_ffn(recv_x[order], sizes, recv_w[order], {"w1": w1, "w3": w3, "w2": w2}, limit,
                                  backend, capacity_factor)
        ys = jnp.zeros_like(ys).at[order].set(ys)
        ys = jnp.where((recv_e < e_local)[:, None], ys, 0.0)
        back = a2a(ys)
        got = jnp.where(keep[:, None], back[jnp.minimum(slot, n_ep * cap - 1)], 0.0)
        dropped = jax.lax.psum(jnp.sum(real & ~keep) + overflow, batch_axes)  # tokens are replicated over the rest
        return jnp.sum(got.reshape(-1, k, d).astype(F32), axis=1), dropped

    valid = jnp.ones(x.shape[:1], bool) if valid is None else valid
    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, P(batch_axes or None), exp, exp, exp),
                       out_specs=(tok, P()), check_vma=False)
    return fn(x, idx, weights, valid, p["w1"], p["w3"], p["w2"])


def routed_experts_ragged(x, idx, weights, p, limit, mesh, backend="ragged_dot", capacity_factor=2.0,
                          valid=None, ep=("expert",)):
    """Dropless expert parallelism with jax.lax.ragged_all_to_all (GPU/TPU; XLA:CPU lacks it).

    Each device sorts its (token, choice) pairs by expert, sends each destination exactly its rows,
    the receiver groups what it got by local expert, runs them, and the results travel back the same
    way. The receive buffer is sized for the worst case (every pair of every peer), so the dispatch
    drops nothing. Padding rows (``valid`` False) travel like the others; their routing weight is
    zero, so they add nothing. Returns (y [t, d] fp32, dropped): dropped counts the (token, choice) pairs past an
    expert's capacity in the ``padded`` backend (0 with the others), over all devices.
    """

    n_ep = int(np.prod([mesh.shape[a] for a in ep]))
    batch_axes = token_axes(mesh)
    e_local = p["w1"].shape[0] // n_ep
    k = idx.shape[1]
    tok = P(batch_axes or None, None)
    exp = P(ep, None, None)

    def local(x, idx, weights, w1, w3, w2):
        d = x.shape[1]
        m = idx.size
        flat_e = idx.reshape(-1)
        order = jnp.argsort(flat_e, stable=True)  # by expert, hence by destination
        xs, ws, es = x[order // k], weights.reshape(-1)[order], flat_e[order]
        counts = jnp.bincount(es, length=n_ep * e_local).reshape(n_ep, e_local).astype(jnp.int32)
        send_sizes = jnp.sum(counts, axis=1)
        in_offsets = jnp.cumsum(send_sizes) - send_sizes
        me = jax.lax.axis_index(ep)
        all_sizes = jax.lax.all_gather(send_sizes, ep)  # [src, dst]
        all_offsets = jax.lax.all_gather(in_offsets, ep)
        out_offsets = jnp.sum(jnp.where(jnp.arange(n_ep)[:, None] < me, all_sizes, 0), axis=0)  # in peer j
        recv_sizes = all_sizes[:, me]
        recv_counts = jax.lax.all_to_all(counts, ep, 0, 0, tiled=True)  # [src, e_local]
        cap = n_ep * m  # worst case: every pair of every peer comes here

        def send(v, buf_rows, offsets, sizes, o_offsets, r_sizes):
            out = jnp.zeros((buf_rows,) + v.shape[1:], v.dtype)
            return jax.lax.ragged_all_to_all(v, out, offsets, sizes, o_offsets, r_sizes, axis_name=ep)

        rx = send(xs, cap, in_offsets, send_sizes, out_offsets, recv_sizes)
        rw = send(ws, cap, in_offsets, send_sizes, out_offsets, recv_sizes)
        # expert id of every received row: sources in order, each sorted by local expert
        bounds = jnp.cumsum(recv_counts.reshape(-1))
        re = jnp.searchsorted(bounds, jnp.arange(cap), side="right") % e_local
        valid = jnp.arange(cap) < jnp.sum(recv_sizes)
        re = jnp.where(valid, re, e_local)
        grp = jnp.argsort(re, stable=True)
        sizes = jnp.sum(recv_counts, axis=0).astype(jnp.int32)
        ys, dropped = expert_ffn(rx[grp], sizes, rw[grp], {"w1": w1, "w3": w3, "w2": w2}, limit, backend,
                                 capacity_factor)
        ys = jnp.zeros_like(ys).at[grp].set(ys)
        ys = jnp.where(valid[:, None], ys, 0.0)
        recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
        back = send(ys, m, recv_offsets, recv_sizes, all_offsets[:, me], send_sizes)
        out = jnp.zeros((m, d), F32).at[order].set(back)
        return jnp.sum(out.reshape(-1, k, d), axis=1), jax.lax.psum(dropped, batch_axes)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=(tok, P()),
                       check_vma=False)
    return fn(x, idx, weights, p["w1"], p["w3"], p["w2"])


def expert_parallel(dispatch, x, idx, weights, p, limit, mesh, backend, capacity_factor, ep=()):
    """Run an expert-parallel ``dispatch`` for any token count and any expert count.

    shard_map splits the t tokens over the batch and context axes and the e experts over the axes
    ``ep``, so both must divide. Token rows are padded to a multiple of the batch devices (the
    padding rows have routing weight 0, are marked invalid and are cut from the result); experts
    are padded with zero-weight experts to a multiple of the ``ep`` devices (no token picks them:
    the router only chooses among the e real ones). Nothing is padded when the sizes already divide.
    """
    batch_ways = int(np.prod([mesh.shape[a] for a in token_axes(mesh)]))
    t, e, n_ep = x.shape[0], p["w1"].shape[0], int(np.prod([mesh.shape[a] for a in ep]))
    pad_t, pad_e = -t % batch_ways, -e % n_ep
    valid = None
    if pad_t:
        x, idx, weights = (jnp.pad(a, ((0, pad_t), (0, 0))) for a in (x, idx, weights))
        valid = jnp.arange(t + pad_t) < t
    if pad_e:
        p = jax.tree.map(lambda v: jnp.pad(v, ((0, pad_e),) + ((0, 0),) * (v.ndim - 1)), p)
    extra = {"ep": ep} if ep else {}
    y, dropped = dispatch(x, idx, weights, p, limit, mesh, backend, capacity_factor, valid, **extra)
    return y[:t], dropped


@jax.named_scope("moe")
def moe(x: jax.Array, p: dict, token_ids: jax.Array, config: ModelConfig, parallel=None, mesh=None):
    """x [b, s, d] (the ffn_norm output), token_ids [b, s] -> (y [b, s, d] in x.dtype, routing info).

    The routing info (idx [b, s, k], scores [b, s, e]) feeds the balance loss and bias update;
    ``dropped`` counts the (token, expert) pairs that got no expert output: over the capacity
    dispatch's per-device limit, or over an expert's capacity in the ``padded`` backend.
    ``parallel`` is a ``v4jax.parallel.ParallelConfig``; ``mesh`` with an ``expert`` axis > 1 (or a
    ``context`` axis with ``parallel.expert_over_context``) turns expert parallelism on over those
    axes (``v4jax.parallel.expert_axes``); on a mesh without them, each device runs its own tokens.
    """
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    idx, w, scores = route(flat, p["gate"], token_ids.reshape(-1), config)
    backend = parallel.moe_backend if parallel else "auto"
    cf = parallel.capacity_factor if parallel else 2.0
    ep = expert_axes(mesh, parallel) if mesh is not None else ()
    if ep:
        dispatch = routed_experts_ragged if parallel is not None and parallel.moe_dispatch == "ragged" \
            else routed_experts_all_to_all
        y, dropped = expert_parallel(dispatch, flat, idx, w, p["experts"], config.swiglu_limit, mesh, backend, cf,
                                     ep)
    elif mesh is not None and token_axes(mesh):
        y, dropped = expert_parallel(routed_experts_per_shard, flat, idx, w, p["experts"], config.swiglu_limit, mesh,
                                     backend, cf)
    else:
        y, dropped = routed_experts(flat, idx, w, p["experts"], config.swiglu_limit, backend, cf)
    y = y + shared_expert(flat, p["shared_experts"], config.swiglu_limit)
    info = {"idx": idx.reshape(b, s, -1), "scores": scores.reshape(b, s, -1), "dropped": dropped}
    return y.astype(x.dtype).reshape(b, s, d), info


# --------------------------------------------------------------------------------------------------
# The modules: parameters (release names), each with its declaration


class Gate(nnx.Module):
    """The router: ``weight`` [E, d], and either the selection bias (learned routers; updated by the
    aux-loss-free rule, not the optimizer) or the hash table ``tid2eid`` [V, K] (hash layers)."""

    def __init__(self, config: ModelConfig, layer: int, init: Init):
        e = config.n_routed_experts
        self.weight = declare(init, matrix((e, config.hidden_size), (None, "embed")))
        if layer < config.num_hash_layers:
            self.tid2eid = declare(init, ParamInfo((config.vocab_size, config.num_experts_per_tok), "hash", "int",
                                                   (None, None), FROZEN, export="int"))
        else:
            self.bias = declare(init, ParamInfo((e,), "zeros", "f32", (None,), FROZEN, export="f32"))


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights, stacked over experts (one Muon matrix per expert)."""

    def __init__(self, config: ModelConfig, init: Init):
        e, f, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        up = ("experts", "mlp", "embed")
        self.w1 = declare(init, matrix((e, f, d), up, export="experts"))
        self.w3 = declare(init, matrix((e, f, d), up, export="experts"))
        self.w2 = declare(init, matrix((e, d, f), ("experts", "embed", "mlp"), export="experts"))


class SharedExpert(nnx.Module):
    """The always-on expert's SwiGLU weights."""

    def __init__(self, config: ModelConfig, init: Init):
        f, d = config.moe_intermediate_size, config.hidden_size
        self.w1 = declare(init, matrix((f, d), ("mlp", "embed"), export="fp8"))
        self.w3 = declare(init, matrix((f, d), ("mlp", "embed"), export="fp8"))
        self.w2 = declare(init, matrix((d, f), ("embed", "mlp"), export="fp8"))


class MoE(nnx.Module):
    """One layer's MoE. Calling it runs ``moe``: x [b, s, d], token ids [b, s] -> (y, info)."""

    def __init__(self, config: ModelConfig, layer: int, init: Init):
        self.config = config
        self.gate = Gate(config, layer, init)
        self.experts = Experts(config, init)
        self.shared_experts = SharedExpert(config, init)

    def __call__(self, x, token_ids, parallel=None, mesh=None):
        return moe(x, pure(self), token_ids, self.config, parallel, mesh)
