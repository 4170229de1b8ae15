"""mHC's Sinkhorn projection as one Pallas kernel per pass (Triton on GPU), forward and backward.

``v4jax.mhc.sinkhorn`` on XLA is a ``fori_loop`` of 2 x iters - 1 normalisations over [tokens, n, n]
arrays of a few bytes per token: per mixing site about 40 kernel launches forward and twice that
backward, each moving the whole array, plus the loop's carry copies (a V4-Flash-shaped step on an
H200 ran thousands of them). Here each token's n x n matrix stays in registers for all iterations:

    forward   logits -> m: one read, one write
    backward  (logits, dm) -> dlogits: the forward is recomputed in registers, each
              normalisation's input kept, then the chain is walked back

The arithmetic is the official projection (see ``v4jax.mhc.sinkhorn``), in fp32:

    m = softmax(logits, rows) + eps;  m = m / (column sums + eps)
    iters - 1 times: m = m / (row sums + eps);  m = m / (column sums + eps)

and the backward of y = x / (sum_a x + eps) along axis a is dx = (dy - sum_a(dy * y)) / (sum_a x + eps);
of y = softmax(z), dz = y * (dy - sum(dy * y)).

Shape letters: t tokens (all leading axes flattened), j source stream (rows), k destination stream
(columns). The kernels take blocks of ``TOKENS_PER_PROGRAM`` tokens; n must be a power of two on GPU
(V4: 4). They run with ``interpret=True`` on the CPU (the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
TOKENS_PER_PROGRAM = 16  # the backward keeps 2 x iters - 1 [16, n, n] blocks live: 78 registers a thread at n = 4
NUM_WARPS = 4


def supported(n: int) -> bool:
    """Whether the GPU kernels take n x n matrices (Triton blocks are powers of two)."""
    return n >= 2 and n & (n - 1) == 0


def fused_sinkhorn(logits: jax.Array, iters: int, eps: float, *, interpret: bool | None = None) -> jax.Array:
    """The Sinkhorn projection of logits [..., n, n] (fp32), differentiable; see the module docstring.

    ``interpret``: run the Pallas interpreter (default: on the CPU backend)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    lead, n = logits.shape[:-2], logits.shape[-1]
    flat = logits.reshape((-1, n, n)).astype(F32)
    return _sinkhorn(iters, float(eps), bool(interpret), flat).reshape(lead + (n, n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sinkhorn(iters, eps, interpret, logits):
    return _call(_forward_kernel, iters, eps, interpret, logits)


def _sinkhorn_fwd(iters, eps, interpret, logits):
    return _sinkhorn(iters, eps, interpret, logits), logits


def _sinkhorn_bwd(iters, eps, interpret, logits, g):
    return (_call(_backward_kernel, iters, eps, interpret, logits, g.astype(F32)),)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def _call(kernel, iters, eps, interpret, *arrays):
    """Run ``kernel`` over blocks of tokens of the [t, n, n] ``arrays`` (padded to whole blocks) ->
    one [t, n, n] fp32 array."""
    t, n = arrays[0].shape[:2]
    bt = TOKENS_PER_PROGRAM
    padded = -(-t // bt) * bt
    arrays = [jnp.pad(a, ((0, padded - t), (0, 0), (0, 0))) for a in arrays]  # zero logits: harmless rows
    spec = pl.BlockSpec((bt, n, n), lambda i: (i, 0, 0))
    out = pl.pallas_call(
        functools.partial(kernel, iters, eps),
        grid=(padded // bt,),
        in_specs=[spec] * len(arrays),
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((padded, n, n), F32),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name=f"sinkhorn_{kernel.__name__.strip('_')}",
    )(*arrays)
    return out[:t]


# Kernels: refs are blocks [bt, n, n]; axis -2 indexes the source stream j, axis -1 the destination
# k (counted from the end, so ``project`` also takes one matrix: v4jax.mhc_kernel's finish).

ROWS, COLUMNS = -1, -2  # the axis a row sum / a column sum runs over


def _softmax_rows(z):
    e = jnp.exp(z - jnp.max(z, axis=ROWS, keepdims=True))
    return e / jnp.sum(e, axis=ROWS, keepdims=True)


def _axes(iters: int) -> list[int]:
    """The axis of each normalisation, in order: columns, then (rows, columns) iters - 1 times."""
    return [COLUMNS] + [ROWS, COLUMNS] * (iters - 1)


def project(logits, iters: int, eps: float):
    """The projection (module docstring) of logits [..., n, n] held in a kernel's registers."""
    m = _softmax_rows(logits) + eps
    for axis in _axes(iters):
        m = m / (jnp.sum(m, axis=axis, keepdims=True) + eps)
    return m


def _forward_kernel(iters, eps, logits_ref, out_ref):
    out_ref[...] = project(logits_ref[...], iters, eps)


def _backward_kernel(iters, eps, logits_ref, g_ref, dlogits_ref):
    soft = _softmax_rows(logits_ref[...])
    m, inputs = soft + eps, []
    for axis in _axes(iters):
        inputs.append(m)
        m = m / (jnp.sum(m, axis=axis, keepdims=True) + eps)
    g = g_ref[...]
    for axis, x in zip(reversed(_axes(iters)), reversed(inputs)):
        total = jnp.sum(x, axis=axis, keepdims=True) + eps
        g = (g - jnp.sum(g * (x / total), axis=axis, keepdims=True)) / total
    dlogits_ref[...] = soft * (g - jnp.sum(g * soft, axis=ROWS, keepdims=True))
