"""mHC's collapse for decoding in two Pallas kernels (``v4jax.mhc_kernel``, interpreted on CPU) against
the spec's formulas written out in numpy (float64) and against the XLA path
(``v4jax.mhc.hc_pre_normed`` without the kernels); and a decode with the kernels against one without.

Tolerances: fp32 streams 1e-5 relative (the mix's sums are reassociated over column blocks); bf16
streams: post and comb 1e-5, the sublayer input within bf16's rounding (1e-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax.decode
from tests.helpers import CONFIGS, rel, sharpened
from tests.test_parity_modules import _np_sinkhorn
from v4jax.decode import extend, init_cache
from v4jax.mhc import KERNEL_MAX_TOKENS, hc_pre_normed
from v4jax.mhc_kernel import collapse_normed, supported
from v4jax.model import init_params

F32 = jnp.float32
HC = dict(sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)


def _np_collapse_normed(x, p, w, iters, hc_eps, eps):
    """Spec §2.3 (``v4jax.mhc`` docstring) then RMSNorm, per token, float64: x [t, n, d]."""
    t, n, d = x.shape
    flat = x.reshape(t, n * d)
    mix = flat @ p["fn"].T / np.sqrt((flat ** 2).mean(-1, keepdims=True) + eps)
    z = mix * np.repeat(p["scale"], [n, n, n * n]) + p["base"]
    sig = 1 / (1 + np.exp(-z))
    pre, post = sig[:, :n] + hc_eps, 2 * sig[:, n:2 * n]
    comb = _np_sinkhorn(z[:, 2 * n:].reshape(t, n, n), iters, hc_eps)
    u = (pre[:, :, None] * x).sum(1)
    return u / np.sqrt((u ** 2).mean(-1, keepdims=True) + eps) * w, post, comb


def _inputs(b, s, n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = (2 + n) * n
    x = rng.normal(size=(b, s, n, d))
    p = {"fn": rng.normal(size=(q, n * d)) * 0.05, "base": rng.normal(size=(q,)), "scale": rng.uniform(0.3, 2, 3)}
    w = 1 + 0.2 * rng.normal(size=(d,))
    jp = {k: jnp.asarray(v, F32) for k, v in p.items()}
    return jnp.asarray(x, dtype), jp, jnp.asarray(w, dtype), p


@pytest.mark.parametrize("b,s,n,d", [(2, 1, 4, 256), (1, 3, 4, 320), (3, 1, 2, 128), (16, 1, 4, 1024)])
def test_kernels_match_the_spec_and_the_xla_path(b, s, n, d):
    """d = 320: a width that is not a power of two (V4-Pro's 7168 is not either); n = 2: another
    stream count, whose 8 mix rows leave no spare column below a power of two; 16 tokens of width
    1024."""
    assert supported(n, d)
    x, p, w, p64 = _inputs(b, s, n, d, F32)
    got = collapse_normed(x, p, w, interpret=True, **HC)
    xla = hc_pre_normed(x, p, w, **HC)
    want = _np_collapse_normed(np.asarray(x, np.float64).reshape(b * s, n, d), p64, np.asarray(w, np.float64),
                               HC["sinkhorn_iters"], HC["hc_eps"], HC["norm_eps"])
    for g, a, ref in zip(got, xla, want):
        assert g.shape == a.shape and g.dtype == a.dtype
        assert rel(g.reshape(ref.shape), ref) <= 1e-5
        assert rel(g, a) <= 1e-5


def test_kernels_with_bf16_streams():
    x, p, w, _ = _inputs(4, 1, 4, 512, jnp.bfloat16, seed=1)
    h, post, comb = collapse_normed(x, p, w, interpret=True, **HC)
    h_x, post_x, comb_x = hc_pre_normed(x, p, w, **HC)
    assert h.dtype == jnp.bfloat16
    assert rel(post, post_x) <= 1e-5 and rel(comb, comb_x) <= 1e-5
    assert rel(h.astype(F32), h_x.astype(F32)) <= 1e-2


def test_supported_shapes():
    assert supported(4, 2048) and supported(4, 7168) and supported(2, 128)
    assert not supported(3, 256) and not supported(4, 4)  # streams not a power of two; blocks under 32 columns


def test_decode_with_the_kernels_equals_decode_without(monkeypatch):
    """A prefill and decode steps with the kernels taken as on a GPU (interpreted) against the same
    without them: the logits and the cache agree to 1e-5."""
    config = CONFIGS["a"]
    params = sharpened(init_params(config, 0))
    prompt = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9)).astype(np.int32)
    steps = np.random.default_rng(3).integers(0, config.vocab_size, (2, 5)).astype(np.int32)

    def run(kernel):
        monkeypatch.setattr(v4jax.decode, "kernel_runs",  # as on a GPU
                            lambda tokens, n, d, _: kernel and tokens <= KERNEL_MAX_TOKENS and supported(n, d))
        jax.clear_caches()  # kernel_runs is read when tracing
        cache = init_cache(config, 2, 32, F32)
        _, cache = extend(params, cache, jnp.asarray(prompt), jnp.full((2,), 9), config, F32)
        out = []
        for i in range(steps.shape[1]):
            token = jnp.asarray(steps[:, i:i + 1])
            logits, cache = extend(params, cache, token, jnp.ones((2,), jnp.int32), config, F32)
            out.append(logits)
        return jnp.stack(out), cache

    (with_k, cache_k), (without, cache_x) = run(True), run(False)
    jax.clear_caches()
    assert rel(with_k, without) <= 1e-5
    for a, b in zip(jax.tree.leaves(cache_k), jax.tree.leaves(cache_x)):
        assert rel(a, b) <= 1e-5 if a.dtype == F32 else (np.asarray(a) == np.asarray(b)).all()


@pytest.mark.parametrize("d,tokens", [(2048, 1), (4096, 32), (7168, 32)])
def test_kernels_lower_for_a_gpu(d, tokens):
    """The Triton lowering (done here without a GPU) takes only arrays whose sizes are powers of two:
    bench-flash-8l's, V4-Flash's and V4-Pro's widths (7168: 112 column blocks of the mix), with as
    many tokens as a decode step of 1 or 32 rows."""
    n = 4
    q = (2 + n) * n
    x = jax.ShapeDtypeStruct((tokens, 1, n, d), jnp.bfloat16)
    p = {"fn": jax.ShapeDtypeStruct((q, n * d), F32), "base": jax.ShapeDtypeStruct((q,), F32),
         "scale": jax.ShapeDtypeStruct((3,), F32)}
    w = jax.ShapeDtypeStruct((d,), jnp.bfloat16)
    fn = jax.jit(lambda x, p, w: collapse_normed(x, p, w, interpret=False, **HC))
    text = fn.trace(x, p, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mhc_mix" in text and "mhc_finish" in text
