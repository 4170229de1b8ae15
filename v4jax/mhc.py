"""Manifold-constrained hyper-connections (mHC): n residual streams mixed around each sublayer.

Per token, in fp32 (spec §2.3; official ``hc_pre``/``hc_post``):

    mix  = (fn @ flatten(X)) * rsqrt(mean(flatten(X)^2) + eps)        # [(2+n)n]
    pre  = sigmoid(mix[:n] * scale[0] + base[:n]) + hc_eps           # collapse weights
    post = 2 * sigmoid(mix[n:2n] * scale[1] + base[n:2n])            # expand weights
    comb = sinkhorn(mix[2n:] * scale[2] + base[2n:])                  # n x n, ~doubly stochastic
    X'   = post[k] * F(norm(sum_j pre[j] X_j)) + sum_j comb[j, k] X_j

Note the transposed residual mix: destination stream k sums over *source* streams j with
comb[j, k]. Getting it the other way round still looks doubly stochastic, so tests check it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import devices, mhc_kernel, sinkhorn_kernel
from v4jax.layers import rms_norm
from v4jax.params import MUON, Init, ParamInfo, declare, pure, vector

F32 = jnp.float32

# The stream mixes below are checkpointed: their backward keeps the inputs (bf16 streams, fp32
# weights of a few numbers per token) and recomputes the fp32 casts inside its own fusions. Autodiff
# of them kept every fp32 cast of the streams, [b, s, n, d] each, as a residual of the layer: twice
# the bytes of the streams, written and read once more per site.


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _mix_logits(x: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """x [b, s, n, d] -> fn @ RMS-normalised flatten(x): [b, s, rows] in fp32 (no learned norm weight)."""
    flat = x.reshape(x.shape[:2] + (-1,)).astype(F32)
    rsqrt = jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)
    return jnp.einsum("bsi,ri->bsr", flat, fn.astype(F32)) * rsqrt


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """Project logits [..., n, n] (rows j = source, columns k = destination) as the official code does.

    Row softmax plus eps, a column normalisation, then ``iters - 1`` (row, column) pairs, each
    denominator plus eps. The last step normalises columns, so each destination stream receives a
    convex combination of the sources. Where ``sinkhorn_kernel_runs`` this is one fused kernel per
    pass (``v4jax.sinkhorn_kernel``), elsewhere ``sinkhorn_loop``; both compute the same fp32 arithmetic.
    """
    if sinkhorn_kernel_runs(logits.shape[-1], devices.current()):
        return sinkhorn_kernel.fused_sinkhorn(logits, iters, eps)
    return sinkhorn_loop(logits, iters, eps)


def sinkhorn_kernel_runs(n: int, acc: devices.Accelerator) -> bool:
    """Whether ``sinkhorn`` of n x n matrices takes the fused kernel on ``acc``: a GPU that runs
    Pallas Triton (compute capability >= 8.0), n a power of two."""
    return devices.pallas_triton(acc) and sinkhorn_kernel.supported(n)


def sinkhorn_loop(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """``sinkhorn`` in XLA. The iterations are a ``fori_loop``, not unrolled: unrolled, they were half
    the compile time of a small model's training step."""

    def row_then_column(_, m):
        m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
        return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

    m = jax.nn.softmax(logits, axis=-1) + eps
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
    return jax.lax.fori_loop(0, iters - 1, row_then_column, m)


@jax.checkpoint
def collapse(x: jax.Array, pre: jax.Array) -> jax.Array:
    """sum_n pre[n] * x[n]: x [b, s, n, d], pre [b, s, n] fp32 -> [b, s, d] in x's dtype.

    The n-stream mixes are written as broadcast-multiply-sums, not einsums: with n = 4 an einsum
    becomes a GEMM with a contraction of 4 (on an H200, 10 ms a step in cuBLAS), while this is one
    memory-bound fusion that reads the bf16 streams and does its arithmetic in fp32.
    """
    return jnp.sum(pre[..., None] * x.astype(F32), axis=2).astype(x.dtype)


@jax.named_scope("mhc")
def hc_pre(x: jax.Array, p: dict, *, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
    """Collapse the streams for a sublayer.

    x: [b, s, n, d]; p: {fn [(2+n)n, n*d], base [(2+n)n], scale [3]}.
    Returns (collapsed [b, s, d] in x.dtype, post [b, s, n] fp32, comb [b, s, n, n] fp32).
    """
    n = x.shape[2]
    mix = _mix_logits(x, p["fn"], norm_eps)
    base, scale = p["base"].astype(F32), p["scale"].astype(F32)
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb_logits = mix[..., 2 * n :] * scale[2] + base[2 * n :]
    comb = sinkhorn(comb_logits.reshape(mix.shape[:2] + (n, n)), sinkhorn_iters, hc_eps)
    return collapse(x, pre), post, comb


@jax.named_scope("mhc")
def hc_pre_normed(x: jax.Array, p: dict, norm_weight: jax.Array, *, sinkhorn_iters: int, hc_eps: float,
                  norm_eps: float, kernel: bool = False):
    """``hc_pre``, then the sublayer's RMSNorm (weight norm_weight [d]) of the collapsed streams ->
    (the sublayer's input [b, s, d], post, comb). ``kernel``: in the two Pallas kernels of
    ``v4jax.mhc_kernel`` (a few tokens, no gradient: decoding; ``kernel_runs`` says where)."""
    if kernel:
        return mhc_kernel.collapse_normed(x, p, norm_weight, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps,
                                          norm_eps=norm_eps)
    u, post, comb = hc_pre(x, p, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps, norm_eps=norm_eps)
    return rms_norm(u, norm_weight, norm_eps), post, comb


# Decoding steps of up to this many tokens take the kernels where they run: each token's programs
# read all of fn (from L2 after the first), which a prefill chunk's thousands of tokens would not
# amortise as XLA's GEMM does.
KERNEL_MAX_TOKENS = 64
USE_KERNEL = True  # bench/decode.py --mhc-xla turns this off to time XLA's fusions in its place


def kernel_runs(tokens: int, n: int, d: int, acc: devices.Accelerator) -> bool:
    """Whether ``hc_pre_normed`` of ``tokens`` tokens (a decode step's) takes the kernels on ``acc``: a
    GPU that runs Pallas Triton, shapes the kernels take, and few enough tokens. (On a mesh, XLA
    gathers the kernels' operands to every device: a Pallas call is not partitioned.)"""
    return (USE_KERNEL and tokens <= KERNEL_MAX_TOKENS and devices.pallas_triton(acc)
            and mhc_kernel.supported(n, d))


@jax.named_scope("mhc")
@jax.checkpoint
def hc_post(f: jax.Array, x: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """Expand a sublayer output f [b, s, d] back into the streams x [b, s, n, d].

    out[k] = post[k] * f + sum_j comb[j, k] * x[j], computed in fp32 and stored in x's dtype.
    """
    out = post[..., None] * f.astype(F32)[:, :, None, :]
    out = out + jnp.sum(comb[..., None] * x.astype(F32)[:, :, :, None, :], axis=2)  # sum over j
    return out.astype(x.dtype)


@jax.named_scope("mhc")
def hc_head(x: jax.Array, p: dict, *, hc_eps: float, norm_eps: float) -> jax.Array:
    """Final collapse before the norm and head: x [b, s, n, d] -> [b, s, d]; p {fn [n, n*d], base [n], scale [1]}."""
    mix = _mix_logits(x, p["fn"], norm_eps)
    pre = jax.nn.sigmoid(mix * p["scale"].astype(F32)[0] + p["base"].astype(F32)) + hc_eps
    return collapse(x, pre)


# --------------------------------------------------------------------------------------------------
# The module: the parameters of one mixing site


class HyperConnection(nnx.Module):
    """The parameters of one mHC site: ``hc_attn`` / ``hc_ffn`` around a sublayer, whose ``fn`` rows
    are the pre [n], post [n] and comb [n*n] maps (three matrices for Muon), or ``hc_head`` before
    the head (``head=True``: pre rows only). All fp32, as in the release."""

    def __init__(self, config, init: Init, head: bool = False):
        n, d = config.hc_mult, config.hidden_size
        rows = n if head else config.hc_mix_dim
        self.head = head
        self.eps = (config.hc_eps, config.rms_norm_eps, config.hc_sinkhorn_iters)
        # fn is replicated, not split over "embed" like the model's [., d] matrices: it is small
        # ((2+n)n x n*d fp32, 1.5 MiB a site at V4-Flash's size), and split it was all-gathered at
        # every use, forward and remat. Replicated, V4-Flash's step on v5p-256 (fsdp 8 x expert 16 x
        # tensor 2) compiled with 3.8 GiB less of temporaries (69.88 against 73.67 GiB a chip,
        # bench/results/2026-12-06-issue32-aot-flash-v5p-256-exchange*.txt) for 0.22 GiB more state.
        self.fn = declare(init, ParamInfo((rows, n * d), "normal", "f32", (None, None), MUON,
                                          None if head else (n, n, n * n), "f32"))
        self.base = declare(init, vector((rows,), init="zeros", kind="f32"))
        self.scale = declare(init, vector((1 if head else 3,), init="hc_scale", kind="f32"))

    def __call__(self, x: jax.Array):
        """``hc_pre`` (a sublayer site) or ``hc_head`` (the head site) on the streams x [b, s, n, d]."""
        hc_eps, norm_eps, iters = self.eps
        if self.head:
            return hc_head(x, pure(self), hc_eps=hc_eps, norm_eps=norm_eps)
        return hc_pre(x, pure(self), sinkhorn_iters=iters, hc_eps=hc_eps, norm_eps=norm_eps)
