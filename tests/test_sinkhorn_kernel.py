"""The fused Sinkhorn kernels (``v4jax.sinkhorn_kernel``, Pallas interpreted on CPU) against the spec's
formula written out in numpy (float64) and against the XLA loop ``v4jax.mhc.sinkhorn_loop``.

* the forward equals the numpy projection, for n = 2, 4, 8, one and 20 iterations, token counts
  that are not a multiple of the kernel's block;
* the gradient (``jax.vjp``, a random cotangent) equals autodiff of the XLA loop, and a central
  finite difference of the numpy projection in float64 along a random direction.

Logits of scale 3 keep the matrices far from uniform, so a wrong axis or a dropped eps shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import rel
from tests.test_parity_modules import _np_sinkhorn
from v4jax.mhc import sinkhorn_loop
from v4jax.sinkhorn_kernel import fused_sinkhorn, supported

EPS = 1e-6


@pytest.mark.parametrize("n,iters,tokens", [(4, 20, (3, 37)), (2, 1, (5,)), (8, 3, (2, 9))])
def test_forward_matches_spec(n, iters, tokens):
    logits = np.random.default_rng(n).normal(0, 3, size=tokens + (n, n))
    got = fused_sinkhorn(jnp.asarray(logits, jnp.float32), iters, EPS, interpret=True)
    assert got.shape == logits.shape and got.dtype == jnp.float32
    assert rel(got, _np_sinkhorn(logits, iters, EPS)) <= 1e-5


@pytest.mark.parametrize("n,iters", [(4, 20), (2, 2)])
def test_gradient_matches_loop_and_finite_differences(n, iters):
    rng = np.random.default_rng(10 + n)
    logits = rng.normal(0, 3, size=(2, 21, n, n))
    cot = rng.normal(size=logits.shape)
    z, ct = jnp.asarray(logits, jnp.float32), jnp.asarray(cot, jnp.float32)
    (got,) = jax.vjp(lambda a: fused_sinkhorn(a, iters, EPS, interpret=True), z)[1](ct)
    (want,) = jax.vjp(lambda a: sinkhorn_loop(a, iters, EPS), z)[1](ct)
    assert rel(got, want) <= 1e-5
    direction = rng.normal(size=logits.shape)
    h = 1e-6
    fd = np.sum(cot * (_np_sinkhorn(logits + h * direction, iters, EPS)
                       - _np_sinkhorn(logits - h * direction, iters, EPS))) / (2 * h)
    assert abs(float(np.sum(np.asarray(got, np.float64) * direction)) - fd) <= 1e-4 * max(abs(fd), 1.0)


def test_supported_sizes():
    assert supported(4) and supported(2) and not supported(3) and not supported(1)
