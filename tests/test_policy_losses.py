"""The post-training objectives (v4jax.policy_losses) against numpy written from the published
formulas (DeepSeekMath's GRPO with the k3 KL estimator; the full-vocabulary reverse KL), values and
gradients with respect to the logits derived by hand, in float64. Tolerance: 1e-5 relative (the
jax side runs in fp32)."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import rel
from v4jax.policy_losses import group_advantages, grpo_loss, reverse_kl_loss, token_log_probs

RNG = np.random.default_rng(0)
B, T, V = 6, 5, 7
LOGITS = RNG.normal(size=(B, T, V)) * 1.5
TOKENS = RNG.integers(0, V, (B, T))
OLD = LOGITS + RNG.normal(size=(B, T, V)) * 0.4  # the sampling policy: ratios inside and outside the clip range
REF = LOGITS + RNG.normal(size=(B, T, V)) * 0.6
MASK = np.ones((B, T))
MASK[0, 3:] = 0  # a short completion
MASK[5] = 0  # a sequence with no completion tokens: left out of the mean
REWARDS = np.array([[1.0, 0.0, 0.5], [2.0, 2.0, -1.0]])  # 2 prompts x 3 samples


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_token_logp(z, tokens):
    return np.take_along_axis(_np_log_softmax(z), tokens[..., None], -1)[..., 0]


def _seq_weights(mask):
    """d(mean over sequences of the mean over their tokens) / d(token value)."""
    n = mask.sum(-1)
    has = n > 0
    return np.where(has[:, None], mask / np.maximum(n, 1)[:, None], 0) / has.sum()


def test_group_advantages():
    got = np.asarray(group_advantages(jnp.asarray(REWARDS, jnp.float32), eps=1e-4))
    want = (REWARDS - REWARDS.mean(1, keepdims=True)) / (REWARDS.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(group_advantages(jnp.ones((1, 4)))) == 0)  # no signal in an equal group


def test_grpo_loss_and_its_gradient_against_numpy():
    eps, beta = 0.2, 0.04
    adv = ((REWARDS - REWARDS.mean(1, keepdims=True)) / (REWARDS.std(1, keepdims=True) + 1e-4)).reshape(-1)
    lp, old, ref = (_np_token_logp(z, TOKENS) for z in (LOGITS, OLD, REF))
    ratio = np.exp(lp - old)
    a = adv[:, None]
    unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    w = _seq_weights(MASK)
    want_loss = -np.sum(w * (np.minimum(unclipped, clipped) - beta * k3))
    # d objective / d logp per token: the surrogate's r A where its unclipped branch is the minimum
    # (0 where the clipped constant is), and -beta dk3/dlogp = beta (exp(ref - logp) - 1)
    dobj = np.where(unclipped <= clipped, ratio * a, 0.0) + beta * (np.exp(ref - lp) - 1)
    p = np.exp(_np_log_softmax(LOGITS))
    onehot = np.eye(V)[TOKENS]
    want_grad = -(w * dobj)[..., None] * (onehot - p)

    def loss(z):
        logp = token_log_probs(z, jnp.asarray(TOKENS))
        return grpo_loss(logp, token_log_probs(jnp.asarray(OLD, jnp.float32), jnp.asarray(TOKENS)),
                         token_log_probs(jnp.asarray(REF, jnp.float32), jnp.asarray(TOKENS)),
                         jnp.asarray(adv, jnp.float32), jnp.asarray(MASK), eps, beta)

    (got_loss, metrics), got_grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(LOGITS, jnp.float32))
    assert rel(got_loss, want_loss) <= 1e-5
    assert rel(got_grad, want_grad) <= 1e-5
    assert np.all(np.asarray(got_grad)[5] == 0)  # the empty sequence takes no gradient
    m = MASK.astype(bool)
    frac = float(np.mean((unclipped > clipped)[m]))
    assert 0 < frac < 1 and abs(float(metrics["clip_fraction"]) - frac) < 1e-6  # both branches exercised
    assert rel(metrics["kl"], np.sum(w * k3)) <= 1e-5


def test_reverse_kl_loss_and_its_gradient_against_numpy():
    """Two teachers weighted 0.7 and 0.3: sum_i w_i sum_v p_s(v) (log p_s(v) - log p_i(v)) per token,
    each teacher's KL computed on its own, gradient p_s * (g - <p_s, g>) with g the weighted
    log-ratio; the loss is given the teachers' weighted log-probabilities only."""
    t1 = LOGITS + RNG.normal(size=(B, T, V))
    t2 = RNG.normal(size=(B, T, V)) * 2
    weights = (0.7, 0.3)
    ls = _np_log_softmax(LOGITS)
    ps = np.exp(ls)
    g = sum(wi * (ls - _np_log_softmax(t)) for wi, t in zip(weights, (t1, t2)))
    w = _seq_weights(MASK)
    want_grad = w[..., None] * ps * (g - np.sum(ps * g, -1, keepdims=True))
    want = np.sum(w * sum(wi * np.sum(ps * (ls - _np_log_softmax(t)), -1) for wi, t in zip(weights, (t1, t2))))
    mixed = jnp.asarray(sum(wi * _np_log_softmax(t) for wi, t in zip(weights, (t1, t2))), jnp.float32)
    got, got_grad = jax.value_and_grad(lambda z: reverse_kl_loss(z, mixed, jnp.asarray(MASK)))(
        jnp.asarray(LOGITS, jnp.float32))
    assert rel(got, want) <= 1e-5
    assert rel(got_grad, want_grad) <= 1e-5
    same = reverse_kl_loss(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(_np_log_softmax(LOGITS), jnp.float32),
                           jnp.asarray(MASK))
    assert abs(float(same)) < 1e-6  # KL of a distribution to itself
