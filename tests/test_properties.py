"""Properties of the forward pass that need no reference: causality and packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS, rel, sharpened
from v4jax.model import forward, init_params

# Same-function comparisons in fp32: only summation order differs.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def run():
    cache = {}

    def go(name, tokens, positions=None, segment_ids=None):
        config = CONFIGS[name]
        if name not in cache:
            cache[name] = (sharpened(init_params(config, seed=0)), jax.jit(lambda p, t, pos, seg: forward(
                p, t, config, positions=pos, segment_ids=seg, mtp=True)))
        params, fn = cache[name]
        out = fn(params, jnp.asarray(tokens), positions, segment_ids)
        return np.asarray(out["logits"]), np.asarray(out["mtp_logits"])

    return go


@pytest.mark.parametrize("name", ["a", "b"])
def test_causal(run, name):
    """Changing token t never changes logits before t (main and MTP heads; MTP position t reads
    token t+1, so its logits may change from t-1 on)."""
    config = CONFIGS[name]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(1, 37))
    base, base_mtp = run(name, tokens)
    for t in (5, 17, 36):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % config.vocab_size
        logits, mtp = run(name, changed)
        np.testing.assert_array_equal(logits[:, :t], base[:, :t])
        np.testing.assert_array_equal(mtp[:, : t - 1], base_mtp[:, : t - 1])
        assert not np.allclose(logits[:, t], base[:, t])  # the change is visible where it should be


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_packed_documents_equal_alone(run, name):
    """Three documents packed in one row (positions restarting, segment ids) give each document's
    logits as if it were run alone. Lengths cross windows and compression blocks and leave partial
    blocks at document ends."""
    config = CONFIGS[name]
    rng = np.random.default_rng(1)
    lengths = [19, 6, 26]
    docs = [rng.integers(0, config.vocab_size, size=n) for n in lengths]
    tokens = np.concatenate(docs)[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    packed, packed_mtp = run(name, tokens, jnp.asarray(positions), jnp.asarray(segments))
    start = 0
    for doc, n in zip(docs, lengths):
        alone, alone_mtp = run(name, doc[None])
        assert rel(packed[:, start : start + n], alone) <= TOLERANCE
        # MTP position t reads token t+1, which at a document's last token belongs to the next one
        assert rel(packed_mtp[:, start : start + n - 1], alone_mtp[:, : n - 1]) <= TOLERANCE
        start += n


def test_packed_rows_are_not_one_document(run):
    """Sanity for the test above: without segment ids the second document sees the first."""
    config = CONFIGS["a"]
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, config.vocab_size, size=12), rng.integers(0, config.vocab_size, size=12)
    joined, _ = run("a", np.concatenate([a, b])[None])
    alone, _ = run("a", b[None])
    assert rel(joined[:, 12:], alone) > 1e-3


def test_linear_f32_of_bf16_operands_is_the_fp32_product():
    """bf16 x bf16 with fp32 accumulation (the path without an fp32 copy of the weight) against the
    float64 product of the same bf16 values: within fp32 summation rounding, as the upcast path is."""
    from v4jax.layers import linear_f32

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(64, 256)), jnp.bfloat16)
    want = np.einsum("bsi,oi->bso", np.asarray(x, np.float64), np.asarray(w, np.float64))
    got = linear_f32(x, w)
    assert got.dtype == jnp.float32 and np.abs(np.asarray(got, np.float64) - want).max() <= 1e-6 * np.abs(want).max()
    upcast = linear_f32(x.astype(jnp.float32), w)  # mixed dtypes: both upcast
    assert np.abs(np.asarray(upcast, np.float64) - want).max() <= 1e-6 * np.abs(want).max()
