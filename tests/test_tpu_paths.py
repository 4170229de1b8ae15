"""The paths the training step takes on a TPU, checked on the CPU (no libtpu, no tokamax needed), and
bench/aot_memory.py's loop-weighted count of a compiled program.

tokamax 0.0.17's Mosaic TPU grouped matmul raises NotImplementedError for operands whose two minor
dimensions are not all >= 128 (tiny.yaml's d = 64, f = 64): on a TPU those products take XLA's
ragged product, so ``moe_backend: auto`` (tokamax on a TPU where it is installed) compiles for
every config (docs/scaling.md).
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from v4jax import attention_kernel, devices, mhc, moe
from v4jax.devices import Accelerator

TPU = Accelerator("tpu", "TPU v5")
H200 = Accelerator("gpu", "NVIDIA H200", (9, 0))


@pytest.mark.parametrize("tokamax", [True, False])
def test_tpu_defaults(monkeypatch, tokamax):
    monkeypatch.setattr(moe, "tokamax_installed", lambda: tokamax)
    assert moe.resolve_backend("auto", TPU) == ("tokamax" if tokamax else "ragged_dot")
    assert moe.tokamax_kernels(TPU) == ("mosaic", "mosaic", "xla")  # never a Triton kernel on a TPU
    assert not mhc.sinkhorn_kernel_runs(4, TPU)
    assert not attention_kernel.runs_on(TPU)


@pytest.mark.parametrize(("a", "b", "want"), [
    ((4096, 2048), (16, 1024, 2048), "mosaic"),  # bench-flash-8l's w1/w3 forward: every minor dim >= 128
    ((4096, 64), (8, 128, 64), "xla"),  # tiny.yaml: d = 64
    ((100, 256), (8, 256, 256), "xla"),  # fewer rows than a tile
])
def test_mosaic_tpu_takes_only_products_it_implements(a, b, want):
    a, b = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in (a, b))
    assert moe.product_kernel("mosaic", a, b, TPU) == want
    assert moe.product_kernel("mosaic", a, b, H200) == "mosaic"  # the GPU kernel has no such limit
    assert moe.product_kernel("xla", a, b, TPU) == "xla"


def test_mosaic_gpu_takes_only_16_bit_products():
    """tokamax's sm90 kernel raises NotImplementedError for fp32 operands (train.dtype float32, the
    default, with tokamax installed on an H100 failed at the first step): those take XLA's."""
    s = lambda dt: jax.ShapeDtypeStruct((4096, 2048), dt)  # noqa: E731
    w = lambda dt: jax.ShapeDtypeStruct((16, 1024, 2048), dt)  # noqa: E731
    assert moe.product_kernel("mosaic", s(jnp.bfloat16), w(jnp.bfloat16), H200) == "mosaic"
    assert moe.product_kernel("mosaic", s(jnp.float16), w(jnp.float16), H200) == "mosaic"
    assert moe.product_kernel("mosaic", s(jnp.float32), w(jnp.float32), H200) == "xla"
    assert moe.product_kernel("mosaic", s(jnp.bfloat16), w(jnp.float32), H200) == "xla"
    assert moe.product_kernel("triton", s(jnp.float32), w(jnp.float32), H200) == "triton"


def test_tiny_products_fall_back_to_xla_on_tpu(monkeypatch):
    """With the accelerator a TPU, tokamax's products at tiny shapes go to jax.lax.ragged_dot_general
    (tokamax itself is never imported), forward and backward."""
    monkeypatch.setattr(devices, "current", lambda: TPU)
    seen = []
    real = jax.lax.ragged_dot_general
    monkeypatch.setattr(jax.lax, "ragged_dot_general", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    x = jnp.ones((16, 64), jnp.float32)
    w = jnp.ones((4, 32, 64), jnp.float32)
    sizes = jnp.array([4, 4, 4, 4], jnp.int32)
    gmm = lambda x, w: moe.kernel_grouped_matmul(x, w, sizes, ("mosaic", "mosaic", "xla")).sum()  # noqa: E731
    jax.grad(gmm, argnums=(0, 1))(x, w)
    assert seen == [moe.FWD, moe.DLHS, moe.DRHS]


def test_aot_memory_weights_loop_bodies_by_their_trip_count():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import aot_memory

    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    layers = 6
    hlo = jax.jit(jax.grad(f)).lower(jnp.ones((layers, 32, 32)), jnp.ones((8, 32))).compile().as_text()
    walk = aot_memory.hlo_loop_counts(hlo)
    assert {lp["trip_count"] for lp in walk["while_loops"]} == {layers}
    one_layer = 2 * 8 * 32 * 32
    # forward: one product a layer; backward: two (input and weight gradients)
    assert walk["dot_flops"] == 3 * layers * one_layer
    assert walk["dot_flops_once"] == 3 * one_layer
