"""Losses and the router bias rule against their formulas written out in numpy (spec §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS
from v4jax.losses import balance_loss, expert_load, indexer_kl, masked_mean, token_nll, update_router_bias, weighted_nll
from v4jax.moe import route

rng = np.random.default_rng(0)


def _np_nll(x, w, targets):
    logits = x.astype(np.float64) @ w.astype(np.float64).T
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
def test_token_nll_matches_the_formula(chunk):
    """Chunked head + logsumexp = -log softmax(x W^T)[target], in numpy float64, for chunks that do
    and do not divide the 2 x 9 tokens; the masked mean is the loss, and weighted_nll with weights
    mask / count gives it too."""
    x, w = rng.normal(size=(2, 9, 6)), rng.normal(size=(13, 6))
    targets = rng.integers(0, 13, size=(2, 9))
    mask = rng.random((2, 9)) > 0.3
    args = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(targets)
    got = token_nll(*args, chunk)
    want = _np_nll(x, w, targets)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(masked_mean(got, jnp.asarray(mask)), (want * mask).sum() / mask.sum(), rtol=1e-5)
    weighted = weighted_nll(*args, jnp.asarray(mask / mask.sum(), jnp.float32), chunk)
    np.testing.assert_allclose(weighted, (want * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 1024])
def test_weighted_nll_gradient_matches_the_dense_form(chunk):
    """Its gradients, computed in the forward pass and scaled by the cotangent (here 2.5), equal
    autodiff of the unchunked log-softmax, for the hidden states, the head and the weights."""
    x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(3, 5)))
    weights = jnp.asarray(rng.random((3, 5)) * (rng.random((3, 5)) > 0.3), jnp.float32)

    def dense(x, w, weights):
        logp = jax.nn.log_softmax(jnp.einsum("bsd,vd->bsv", x, w), axis=-1)
        return 2.5 * jnp.sum(-jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)

    want = jax.grad(dense, argnums=(0, 1, 2))(x, w, weights)
    got = jax.grad(lambda *a: 2.5 * weighted_nll(a[0], a[1], targets, a[2], chunk), argnums=(0, 1, 2))(x, w, weights)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_weighted_nll_on_rows_split_over_devices():
    """Rows split over 8 fake devices: the loss and its gradients equal one device's (fp32, 1e-6
    relative), and every device computes the head for its own rows only: the compiled program has
    no all-gather (only the head gradient's all-reduce), and with 8 tokens per step and shard its
    loop takes 8 positions of the device's one row per step, 2 steps for a row of 9 (chunks of
    consecutive tokens of the flattened batch made every device gather the whole batch)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from v4jax.parallel import ParallelConfig, make_mesh

    mesh = make_mesh(ParallelConfig(8, 1, 1, 1))
    x = jnp.asarray(rng.normal(size=(8, 9, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(13, 6)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 13, size=(8, 9)))
    weights = jnp.asarray(rng.random((8, 9)), jnp.float32)

    def loss(shards):
        return jax.value_and_grad(lambda x, w: weighted_nll(x, w, targets, weights, 8, shards), argnums=(0, 1))

    want = jax.jit(loss(1))(x, w)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    step = jax.jit(loss(8), in_shardings=(rows, NamedSharding(mesh, PartitionSpec())))
    got = step(jax.device_put(x, rows), w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-6 * np.abs(np.asarray(r)).max()
    hlo = step.lower(x, w).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo
    assert "f32[2,8,6]" in hlo  # x in the loop's chunks: 2 steps of 8 positions of this device's row


def test_token_nll_bf16_inputs_accumulate_in_fp32():
    """bf16 hidden states and head (the training path) give the fp32 value of the same bf16
    numbers to fp32 accuracy: the products are exact and the sums are fp32."""
    rng = np.random.default_rng(7)  # its own draws: the shared stream depends on which tests a worker ran
    x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(9, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, size=(2, 6)))
    got = token_nll(x, w, targets, 5)
    want = _np_nll(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32)),
                   np.asarray(targets))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ones = jnp.ones(targets.shape, jnp.float32)
    gx, gw = jax.grad(lambda x, w: weighted_nll(x, w, targets, ones, 5), argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32


def test_balance_loss():
    b, s, e, k = 3, 7, 6, 2
    scores = rng.random((b, s, e)) + 0.1
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(b * s)]).reshape(b, s, k)
    mask = rng.random((b, s)) > 0.2
    want = 0.0
    for row in range(b):
        t = mask[row].sum()
        f = np.array([e / (k * t) * sum(int(i in idx[row, j]) for j in range(s) if mask[row, j]) for i in range(e)])
        norm = scores[row] / scores[row].sum(-1, keepdims=True)
        p = np.array([norm[mask[row], i].sum() / t for i in range(e)])
        want += (f * p).sum() / b
    got = balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(idx), jnp.asarray(mask), k)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_balance_loss_is_one_when_uniform():
    """With uniform scores and perfectly even routing, sum_i f_i P_i = 1 (a known fixed point)."""
    e, k = 4, 2
    idx = np.array([[[0, 1], [2, 3]] * 3])
    got = balance_loss(jnp.ones((1, 6, e)), jnp.asarray(idx), jnp.ones((1, 6)), k)
    np.testing.assert_allclose(got, 1.0, rtol=1e-6)


def test_indexer_kl():
    b, s, n = 2, 4, 5
    scores = rng.normal(size=(b, s, n))
    probs = rng.random((b, s, n))
    used = rng.random((b, s, n)) > 0.4
    used[0, 0] = False  # a query with no entry is skipped
    mask = np.ones((b, s))
    total, count = 0.0, 0
    for i in range(b):
        for t in range(s):
            u = used[i, t]
            if not u.any():
                continue
            p = probs[i, t, u] / probs[i, t, u].sum()
            q = np.exp(scores[i, t, u] - scores[i, t, u].max())
            q /= q.sum()
            total += (p * np.log(p / q)).sum()
            count += 1
    got = indexer_kl(*(jnp.asarray(a) for a in (scores.astype(np.float32), probs.astype(np.float32), used, mask)))
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_bias_update_balances_a_skewed_router():
    """A router whose weights favour two experts for every token: the aux-loss-free rule (u = 0.001)
    moves the biases until the load is even, without touching the weights."""
    config = CONFIGS["a"].replace(n_routed_experts=8, num_experts_per_tok=2)
    d = config.hidden_size
    common = rng.normal(size=d)
    x = (rng.normal(size=(512, d)) + common).astype(np.float32)
    w = rng.normal(0, 0.02, size=(8, d)).astype(np.float32)
    w[:2] += 0.1 * common / np.sqrt(d)  # experts 0 and 1 score higher on every token
    gate = {"weight": jnp.asarray(w), "bias": jnp.zeros(8)}
    ids = jnp.zeros(512, jnp.int32)

    def load():
        idx, _, _ = route(jnp.asarray(x), gate, ids, config)
        return expert_load(idx[None], jnp.ones((1, 512)), 8)

    first = np.asarray(load())
    assert first.max() / first.mean() > 3.0
    for _ in range(600):
        gate["bias"] = update_router_bias(gate["bias"], load(), 1e-3)
    last = np.asarray(load())
    assert last.max() / last.mean() < 1.3, last
    bias = np.asarray(gate["bias"])
    assert set(np.argsort(bias)[:2]) == {0, 1} and bias[:2].max() < 0  # the favoured experts went down
