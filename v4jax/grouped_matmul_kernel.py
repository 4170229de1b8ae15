"""The grouped matmul's weight gradient as one Pallas kernel (Triton on GPU).

The routed experts' rows are sorted by expert, so the weight gradient of a grouped matmul is a sum
over each group's rows (a ragged contracting dimension):

    out[g] = a[rows of g]^T . b[rows of g]        a [m, p], b [m, q], sizes [g] -> out [g, p, q]

One program computes one [bp, bq] tile of one group's output: it walks that group's rows bm at a
time (masked at the group's ends), accumulating in fp32 registers, and writes the tile once. The
operand order picks the output layout: (x, dy) gives [g, k, n], (dy, x) gives [g, n, k], so a
caller can have the gradient in its weights' stored layout without a transpose. Rows past
sum(sizes) belong to no group and are never read.

Shape letters: m rows, g groups, p and q the two operands' columns (multiples of 16).
The kernel runs with ``interpret=True`` on the CPU (the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from v4jax import devices

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Blocks:
    # The defaults were the fastest of bench/moe_kernels.py's sweep on an H200 for both of
    # V4-Flash-8l's weight gradients (docs/benchmarks.md, Part 5).
    rows: int = 64  # bm: rows per step of a group's walk
    p: int = 128  # bp: output tile rows
    q: int = 256  # bq: output tile columns
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def for_device(cls, acc: devices.Accelerator, itemsize: int = 2) -> Blocks:
        """The defaults, whose 3 stages of [64, 128] and [64, 256] bf16 operand tiles take 144 KB of
        shared memory, except on GPUs that give a thread block less than 160 KB (99 KB on sm86,
        sm89, sm120): there tiles a sixth of that size, so Triton's compile fits; not timed.
        Operands of ``itemsize`` 4 (fp32) take two stages: three asked 256 KB on an H100, which
        gives a block 227 KB."""
        if acc.platform != "gpu" or devices.shared_memory_kb(acc) >= 160:
            return cls() if itemsize <= 2 else cls(num_stages=2)
        return cls(rows=32, p=64, q=128, num_warps=4, num_stages=2)


def group_outer(a: jax.Array, b: jax.Array, sizes: jax.Array, out_dtype=F32, blocks: Blocks | None = None,
                interpret: bool | None = None) -> jax.Array:
    """out[g] = a[rows of g]^T b[rows of g] for rows sorted by group: a [m, p], b [m, q], sizes [g]
    (int) -> [g, p, q] in ``out_dtype``, fp32 accumulation. A tile side is the block's or, where that
    does not divide the columns, their largest common power of two (at least 16: Triton's dot).

    ``blocks``: default ``Blocks.for_device`` of this process's accelerator and the operands' width. ``interpret``: run the
    Pallas interpreter (default: on the CPU backend)."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    blocks = blocks or Blocks.for_device(devices.current(), max(a.dtype.itemsize, b.dtype.itemsize))
    (m, p), q, g = a.shape, b.shape[1], sizes.shape[0]
    blocks = dataclasses.replace(blocks, p=math.gcd(p, blocks.p), q=math.gcd(q, blocks.q))
    if b.shape[0] != m or min(blocks.p, blocks.q) < 16:
        raise ValueError(f"group_outer: a {a.shape} and b {b.shape} need the same rows, and columns that "
                         "are multiples of 16")
    ends = jnp.cumsum(sizes.astype(jnp.int32))
    bounds = jnp.stack([ends - sizes.astype(jnp.int32), ends], axis=1)  # [g, 2]: each group's first and past-last row
    whole = lambda x: pl.BlockSpec(x.shape, lambda e, i, j: (0,) * x.ndim)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_kernel, blocks.rows),
        grid=(g, p // blocks.p, q // blocks.q),
        in_specs=[whole(bounds), whole(a), whole(b)],
        out_specs=pl.BlockSpec((None, blocks.p, blocks.q), lambda e, i, j: (e, i, j)),
        out_shape=jax.ShapeDtypeStruct((g, p, q), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="group_outer",
    )(bounds, a, b)


def _kernel(bm, bounds_ref, a_ref, b_ref, out_ref):
    e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = bounds_ref[e, 0], bounds_ref[e, 1]
    bp, bq = out_ref.shape
    last = a_ref.shape[0] - 1
    cols_a = (i * bp + jnp.arange(bp, dtype=jnp.int32))[None, :]
    cols_b = (j * bq + jnp.arange(bq, dtype=jnp.int32))[None, :]
    lane = jnp.arange(bm, dtype=jnp.int32)

    def step(t, acc):
        r = start + t * bm + lane
        ok = (r < end)[:, None]
        rows = jnp.minimum(r, last)[:, None]  # in range for the interpreter's gather; masked anyway
        a = plgpu.load(a_ref.at[rows, cols_a], mask=ok, other=0.0)
        b = plgpu.load(b_ref.at[rows, cols_b], mask=ok, other=0.0)
        return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    steps = jax.lax.div(jnp.maximum(end - start, 0) + bm - 1, bm)
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bp, bq), F32))
    out_ref[...] = acc.astype(out_ref.dtype)
