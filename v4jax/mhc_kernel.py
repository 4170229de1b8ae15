"""mHC's collapse for a few tokens (decoding) as two Pallas kernels (Triton on GPU).

``v4jax.mhc.hc_pre`` followed by the sublayer's RMSNorm is, in XLA on an H100, about seven kernels
per mixing site and token block: the streams' sum of squares, the fn GEMV of the mix logits, the
elementwise maps, a pad, the Sinkhorn, the collapse, the norm's sum of squares and its cast
(bench-flash-8l's decode program, batch 1). At decode each moves a few KB, so each costs about its
launch: 16 sites, over a hundred launches a token. Here the same arithmetic is two kernels:

    mix     x [t, n*d], fn [q, n*d] -> per block of (up to) ``CHUNK`` columns, the partial sums
            fn . x (q of them) and x . x: partial [t, chunks, qp], the latter in column q
    finish  (partial, x, base, scale, norm weight) -> h = rms_norm(sum_j pre_j x_j) * w,
            post [t, n], comb [t, n, n] (the Sinkhorn in registers, as ``v4jax.sinkhorn_kernel``)

with t tokens, n streams, d model, q = (2 + n) n mix rows, qp the power of two above q. The
arithmetic is ``hc_pre``'s in fp32 (the mix's sums reassociated over the column blocks: equal to
about 1e-6 relative), the collapse rounded to the streams' dtype before the norm as
``rms_norm(collapse(...))`` rounds it. No gradient: for inference only. The kernels run with
``interpret=True`` on the CPU (the tests).

On an H100 (docs/benchmarks.md Part 16) they took 79 launches off a batch-1 token of bench-flash-8l
and 4% of its time, nothing at batch 32: ``finish`` runs 5.8 us a launch (one program per token,
the Sinkhorn's reductions across 4 warps), ``mix`` 2.2 us (5.5 at 32 tokens). Two variants were
slower and dropped: ``finish`` on one warp over 512-column blocks (11.6 us), and 8 tokens per
``mix`` program reading fn's block once for them (7.8 us at 32 tokens: 8 times fewer programs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from v4jax import sinkhorn_kernel

F32 = jnp.float32
CHUNK = 256  # columns of flatten(x) per mix program (at most): its fn block [qp, 256] fp32 is 64 registers a thread
NUM_WARPS = 4


def _pow2_above(v: int) -> int:
    return 1 << v.bit_length()  # the smallest power of two > v


def _chunk(n: int, d: int) -> int:
    """Columns of flatten(x) per ``mix`` program: the largest power of two <= CHUNK that divides n*d."""
    return math.gcd(n * d, CHUNK)


def supported(n: int, d: int) -> bool:
    """Whether the kernels take n streams of width d: n a power of two, and n*d in blocks of at least
    32 columns (Triton blocks are powers of two)."""
    return n >= 2 and n & (n - 1) == 0 and _chunk(n, d) >= 32


def collapse_normed(x: jax.Array, p: dict, norm_weight: jax.Array, *, sinkhorn_iters: int, hc_eps: float,
                    norm_eps: float, interpret: bool | None = None):
    """``hc_pre`` then the sublayer's RMSNorm: x [b, s, n, d], p {fn [q, n*d], base [q], scale [3]},
    norm_weight [d] -> (rms_norm(collapsed) [b, s, d] in x's dtype, post [b, s, n] fp32,
    comb [b, s, n, n] fp32). ``interpret``: run the Pallas interpreter (default: on the CPU backend)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, s, n, d = x.shape
    t, q = b * s, p["fn"].shape[0]
    qp = _pow2_above(q)
    width = _chunk(n, d)
    chunks = n * d // width
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    fn = p["fn"].astype(F32)
    partial = pl.pallas_call(
        functools.partial(_mix_kernel, q),
        grid=(t, chunks),
        in_specs=[pl.BlockSpec((None, width), lambda i, c: (i, c)), whole(fn)],
        out_specs=pl.BlockSpec((None, None, qp), lambda i, c: (i, c, 0)),
        out_shape=jax.ShapeDtypeStruct((t, chunks, qp), F32),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1), interpret=interpret,
        name="mhc_mix",
    )(x.reshape(t, n * d), fn)
    base, scale = p["base"].astype(F32), p["scale"].astype(F32)
    dp = _pow2_above(d - 1)  # h is written [t, dp], whole blocks (a masked store would write duplicates)
    warps = min(16, max(NUM_WARPS, n * dp // 2048))  # [n, dp] in registers: 64 values a thread
    row = lambda *shape: pl.BlockSpec((None,) + shape, lambda i: (i,) + (0,) * len(shape))  # noqa: E731
    h, post, comb = pl.pallas_call(
        functools.partial(_finish_kernel, q, sinkhorn_iters, float(hc_eps), float(norm_eps)),
        grid=(t,),
        in_specs=[row(chunks, qp), row(n, d), whole(base), whole(scale), whole(norm_weight)],
        out_specs=[row(dp), row(n), row(n, n)],
        out_shape=[jax.ShapeDtypeStruct((t, dp), x.dtype), jax.ShapeDtypeStruct((t, n), F32),
                   jax.ShapeDtypeStruct((t, n, n), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1), interpret=interpret,
        name="mhc_finish",
    )(partial, x.reshape(t, n, d), base, scale, norm_weight)
    return h[:, :d].reshape(b, s, d), post.reshape(b, s, n), comb.reshape(b, s, n, n)


def _mix_kernel(q, x_ref, fn_ref, out_ref):
    """One block of columns of one token: out [qp] = (fn[:, block] . x[block], with x[block] . x[block]
    in column q). fn's rows past q are masked (the block has qp rows)."""
    c = pl.program_id(1)
    qp, = out_ref.shape
    width, = x_ref.shape
    rows = jnp.arange(qp, dtype=jnp.int32)
    cols = c * width + jnp.arange(width, dtype=jnp.int32)
    x = x_ref[...].astype(F32)
    fn = plgpu.load(fn_ref.at[jnp.minimum(rows, q - 1)[:, None], cols[None, :]], mask=(rows < q)[:, None], other=0.0)
    mix = jnp.sum(fn * x[None, :], axis=1)
    out_ref[...] = jnp.where(rows == q, jnp.sum(x * x), mix)


def _finish_kernel(q, iters, hc_eps, norm_eps, part_ref, x_ref, base_ref, scale_ref, w_ref, h_ref, post_ref,
                   comb_ref):
    """One token: the partial sums -> the mix logits (``v4jax.mhc._mix_logits``), pre, post and the
    Sinkhorn of comb as ``v4jax.mhc.hc_pre``, then h = rms_norm(sum_j pre_j x_j) * w. A width d, or
    a count of column blocks, that is not a power of two (V4-Pro: d = 7168, 112 blocks) is read
    masked to the power of two above, and h written [dp] (zeros past d)."""
    n, d = x_ref.shape
    chunks, qp = part_ref.shape
    blocks = jnp.arange(_pow2_above(chunks - 1), dtype=jnp.int32)  # a Triton block: a power of two
    cols = jnp.arange(qp, dtype=jnp.int32)
    part = plgpu.load(part_ref.at[jnp.minimum(blocks, chunks - 1)[:, None], cols[None, :]],
                      mask=(blocks < chunks)[:, None], other=0.0)
    total = jnp.sum(part, axis=0)  # [qp]
    squares = jnp.sum(jnp.where(cols == q, total, 0.0))
    mix = total * jax.lax.rsqrt(squares / (n * d) + norm_eps)
    base = plgpu.load(base_ref.at[jnp.minimum(cols, q - 1)], mask=cols < q, other=0.0)
    scale = jnp.where(cols < n, scale_ref[0], jnp.where(cols < 2 * n, scale_ref[1], scale_ref[2]))
    z = mix * scale + base
    k = jnp.arange(n, dtype=jnp.int32)
    pick = lambda at, v: jnp.sum(jnp.where(at[..., None] == cols, v, 0.0), axis=-1)  # noqa: E731  v[at]
    pre = pick(k, jax.nn.sigmoid(z)) + hc_eps  # [n]
    post_ref[...] = 2.0 * pick(n + k, jax.nn.sigmoid(z))
    comb_ref[...] = sinkhorn_kernel.project(pick(2 * n + k[:, None] * n + k[None, :], z), iters, hc_eps)  # [j, k]
    dp, = h_ref.shape
    c = jnp.arange(dp, dtype=jnp.int32)
    ok, at = c < d, jnp.minimum(c, d - 1)
    xs = plgpu.load(x_ref.at[k[:, None], at[None, :]], mask=ok[None, :], other=0.0).astype(F32)  # [n, dp]
    u = jnp.sum(pre[:, None] * xs, axis=0).astype(h_ref.dtype).astype(F32)  # collapse(), in x's dtype
    w = plgpu.load(w_ref.at[at], mask=ok, other=0.0).astype(F32)
    h = u * jax.lax.rsqrt(jnp.sum(u * u) / d + norm_eps) * w
    h_ref[...] = h.astype(h_ref.dtype)
