"""The grouped matmul's weight-gradient kernel (v4jax.grouped_matmul_kernel, Pallas interpret mode
on the CPU) against the per-group sum written out in numpy and against XLA's ragged-contracting
product (jax.lax.ragged_dot_general). fp32; tolerances stated per test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.grouped_matmul_kernel import Blocks, group_outer
from v4jax.moe import DRHS


def _reference(a, b, sizes):
    out, start = np.zeros((len(sizes), a.shape[1], b.shape[1])), 0
    for g, n in enumerate(sizes):
        out[g] = a[start:start + n].T.astype(np.float64) @ b[start:start + n]
        start += n
    return out


@pytest.mark.parametrize("sizes", [[37, 0, 90, 1, 50], [0, 0, 200, 0, 0], [1, 1, 1, 1, 1]])
def test_group_outer_matches_numpy(sizes):
    """Empty groups give zeros, rows past sum(sizes) (here up to 199) are never read (NaN there
    would show), group ends fall inside a block of rows. Relative error 1e-5."""
    rng = np.random.default_rng(0)
    m, p, q = 200, 32, 48
    a = rng.normal(size=(m, p)).astype(np.float32)
    b = rng.normal(size=(m, q)).astype(np.float32)
    total = sum(sizes)
    a[total:], b[total:] = np.nan, np.nan
    got = np.asarray(group_outer(jnp.asarray(a), jnp.asarray(b), jnp.asarray(sizes, jnp.int32),
                                 blocks=Blocks(rows=16, p=16, q=16)))
    ref = _reference(a, b, sizes)
    assert got.shape == (5, p, q)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_group_outer_matches_ragged_dot_general_in_bf16():
    """bf16 operands, fp32 accumulation and a bf16 result as the model calls it, against XLA's
    ragged-contracting product with the same dimension numbers; tiles narrower than the default
    blocks (p 48 -> 16). Equal up to one bf16 rounding of the result (relative 1e-2)."""
    rng = np.random.default_rng(1)
    sizes = jnp.array([30, 5, 0, 29], jnp.int32)
    a = jnp.asarray(rng.normal(size=(64, 48)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(64, 128)), jnp.bfloat16)
    got = group_outer(a, b, sizes, out_dtype=jnp.bfloat16)
    ref = jax.lax.ragged_dot_general(a, b, sizes, DRHS, preferred_element_type=jnp.float32)
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert err <= 1e-2


def test_group_outer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiples of 16"):
        group_outer(jnp.zeros((8, 24)), jnp.zeros((8, 32)), jnp.array([8]))
    with pytest.raises(ValueError, match="same rows"):
        group_outer(jnp.zeros((8, 32)), jnp.zeros((9, 32)), jnp.array([8]))


def test_blocks_fit_the_shared_memory_for_the_operand_width():
    """Triton keeps ``num_stages`` copies of a [rows, p] and a [rows, q] operand tile in shared
    memory: the blocks chosen for bf16 and for fp32 operands fit what a thread block gets (fp32 with
    three stages asked 256 KB on an H100 and failed to compile)."""
    from v4jax import devices  # noqa: PLC0415

    for acc in (devices.Accelerator("gpu", "NVIDIA H100", (9, 0)), devices.Accelerator("gpu", "RTX", (8, 9))):
        for itemsize in (2, 4):
            bl = Blocks.for_device(acc, itemsize)
            tiles = bl.num_stages * bl.rows * (bl.p + bl.q) * itemsize
            assert tiles <= devices.shared_memory_kb(acc) * 1024 * 0.9, (acc, itemsize, bl)
