"""The post-training objectives (spec §4 "Post-training"): GRPO and multi-teacher on-policy distillation.

Shape letters: B sequences (prompts x samples), T tokens of a sequence, V vocabulary, G samples
per prompt, P prompts.

* **GRPO** (DeepSeekMath §4.1, as V3 and V4 use it): for each prompt, G completions are sampled
  from the old policy; each gets a scalar reward, and its advantage is the reward normalised
  within its group, (r - mean) / (std + eps) (``group_advantages``), for every token of it. The
  objective per completion token t of sequence i, with ratio r = pi(o_t) / pi_old(o_t):

      min(r A_i, clip(r, 1 - eps, 1 + eps) A_i) - beta * k3,
      k3 = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1

  (k3: the unbiased, non-negative estimator of KL(pi || pi_ref) from samples of pi). It is
  averaged over each completion's tokens, then over completions; ``grpo_loss`` is its negative.
* **On-policy distillation** (V4's merge of specialists): the student samples, each teacher
  scores the samples, and the loss per completion token is the full-vocabulary reverse KL
  sum_i w_i KL(pi_theta || pi_E_i) = sum_i w_i sum_v pi_theta(v) (log pi_theta(v) - log pi_E_i(v)),
  averaged over the completion tokens (``reverse_kl_loss``). With weights summing to 1 this is
  sum_v pi_theta(v) (log pi_theta(v) - M(v)), M = sum_i w_i log pi_E_i: the teachers enter only
  through M, one [B, T, V] array however many they are.

All in fp32; token log-probabilities come from ``token_log_probs`` (log-softmax of the logits at
the sampled tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens]: logits [B, T, V], tokens [B, T] int -> [B, T] fp32."""
    lp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def group_advantages(rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
    """rewards [P, G] -> advantages [P, G]: (r - group mean) / (group std + eps), std over the G
    samples with ddof 0. A group whose rewards are all equal gets 0 (no signal)."""
    r = rewards.astype(F32)
    mean = r.mean(axis=-1, keepdims=True)
    std = r.std(axis=-1, keepdims=True)
    return (r - mean) / (std + eps)


def _per_sequence_mean(values: jax.Array, mask: jax.Array, sequences=None) -> jax.Array:
    """Mean over each sequence's masked tokens, then over the sequences that have any (or, given
    ``sequences``, summed and divided by it: a micro-batch's share of its update's mean)."""
    m = mask.astype(F32)
    n = m.sum(axis=-1)
    per_seq = (values * m).sum(axis=-1) / jnp.maximum(n, 1.0)
    has = (n > 0).astype(F32)
    return (per_seq * has).sum() / jnp.maximum(has.sum() if sequences is None else sequences, 1.0)


def count_sequences(mask: jax.Array) -> jax.Array:
    """How many sequences of mask [B, T] have a masked token: the objectives' outer denominator."""
    return jnp.sum(jnp.any(mask > 0, axis=-1)).astype(F32)


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
              mask: jax.Array, clip_eps: float = 0.2, kl_coef: float = 0.04, sequences=None, tokens=None
              ) -> tuple[jax.Array, dict]:
    """The negative GRPO objective (module docstring).

    logp [B, T]: the completion tokens' log-probabilities under the policy being trained;
    old_logp, ref_logp [B, T]: under the sampling policy and the frozen reference (no gradient
    flows into either); advantages [B] (or [B, T], one per token); mask [B, T]: 1 on completion
    tokens. ``sequences``, ``tokens``: for a micro-batch, its update's count of sequences with
    completion tokens and of those tokens (the denominators; by default this batch's). -> (loss,
    metrics: ``kl`` (the k3 mean), ``clip_fraction`` (tokens whose ratio was clipped and counted),
    ``ratio``).
    """
    old_logp, ref_logp = jax.lax.stop_gradient(old_logp), jax.lax.stop_gradient(ref_logp)
    a = advantages.astype(F32)
    a = a[:, None] if a.ndim == 1 else a
    ratio = jnp.exp(logp - old_logp)
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    log_ref_over = ref_logp - logp
    k3 = jnp.exp(log_ref_over) - log_ref_over - 1
    objective = _per_sequence_mean(surrogate - kl_coef * k3, mask, sequences)
    clipped = (ratio * a > jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a).astype(F32)
    m = mask.astype(F32)
    count = jnp.maximum(m.sum() if tokens is None else tokens, 1.0)
    metrics = {"kl": _per_sequence_mean(k3, mask, sequences), "clip_fraction": (clipped * m).sum() / count,
               "ratio": (ratio * m).sum() / count}
    return -objective, jax.tree.map(jax.lax.stop_gradient, metrics)


def reverse_kl_loss(student_logits: jax.Array, mixed: jax.Array, mask: jax.Array, sequences=None) -> jax.Array:
    """Multi-teacher full-vocabulary reverse KL, sum_i w_i KL(pi_student || pi_teacher_i) per token,
    averaged over each sequence's masked tokens, then over sequences (module docstring):
    student_logits [B, T, V]; ``mixed`` [B, T, V] = sum_i w_i log pi_teacher_i, the teachers'
    log-probabilities weighted by weights summing to 1 (no gradient flows into it); mask [B, T];
    ``sequences`` as in ``grpo_loss``."""
    ls = jax.nn.log_softmax(student_logits.astype(F32), axis=-1)
    per_token = jnp.sum(jnp.exp(ls) * (ls - jax.lax.stop_gradient(mixed.astype(F32))), axis=-1)
    return _per_sequence_mean(per_token, mask, sequences)
