"""Losses and the router bias rule against their formulas written out in numpy (spec §4)."""

import jax.numpy as jnp
import numpy as np

from tests.tiny_configs import CONFIGS
from v4jax.losses import balance_loss, cross_entropy, expert_load, indexer_kl, update_router_bias
from v4jax.moe import route

rng = np.random.default_rng(0)


def test_cross_entropy():
    logits = rng.normal(size=(2, 5, 11))
    targets = rng.integers(0, 11, size=(2, 5))
    mask = rng.random((2, 5)) > 0.3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    want = (nll * mask).sum() / mask.sum()
    got = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5)


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
