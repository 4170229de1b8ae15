"""DeepSeek-V4 training losses and the aux-loss-free router bias update (spec §4).

* next-token cross-entropy, and the MTP cross-entropy (token t+2) with its weight λ;
* the sequence-wise balance loss (V3 form, weight 1e-4);
* the lightning-indexer KL loss (V3.2's DSA form adapted to compressed entries);
* the router bias update b ← b + u·sign(mean load − load), u = 0.001, outside the optimiser.

Choices where the spec says a detail is unpublished:

* **Balance loss scope.** Computed per packed row (a row counts as one sequence) over its real
  tokens, for the layers with a learned router (hash layers choose by token id, so the loss could not
  change their choice), averaged over rows and summed over layers.
* **Indexer target.** p_t is the main attention's probability of each compressed entry, summed over
  heads and renormalised over the entries the query used (all visible ones in the dense stage, the
  selected ones in the sparse stage); the KL is taken against the indexer's softmax over the same
  entries. Window keys and the sink are left out of the target: the indexer only ranks compressed
  entries. The target is a constant (stop-gradient) and the indexer's inputs are detached, so the KL
  trains only the indexer and the LM loss never does.
* **Bias update load.** The load is counted over the whole global batch (all hosts), per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.config import CSA, ModelConfig

F32 = jnp.float32


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over masked positions. logits [b, s, V] fp32, targets/mask [b, s]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(F32)
    return jnp.sum((logz - picked) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def balance_loss(scores: jax.Array, idx: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """Sequence-wise balance loss of one layer: mean over rows of sum_i f_i P_i.

    scores [b, s, E] (sqrt-softplus affinities), idx [b, s, K] chosen experts, mask [b, s].
    f_i = E / (K T) * #(tokens of the row routed to i), P_i = mean_t s_i / sum_j s_j.
    """
    e = scores.shape[-1]
    mask = mask.astype(F32)
    tokens = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [b]
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=F32) * mask[..., None, None], axis=(1, 2))  # [b, E]
    f = counts * e / (k * tokens[:, None])
    norm = scores / jnp.sum(scores, axis=-1, keepdims=True)
    p = jnp.sum(norm * mask[..., None], axis=1) / tokens[:, None]
    return jnp.mean(jnp.sum(f * p, axis=-1))


def indexer_kl(index_scores: jax.Array, entry_probs: jax.Array, entry_mask: jax.Array, mask: jax.Array) -> jax.Array:
    """KL(p || softmax(I)) over the entries each query used, averaged over queries that used any.

    index_scores, entry_probs [b, s, n]; entry_mask [b, s, n] bool; mask [b, s] (real tokens).
    """
    p = jax.lax.stop_gradient(entry_probs) * entry_mask
    total = jnp.sum(p, axis=-1, keepdims=True)
    has = (total[..., 0] > 0) & (mask > 0)
    p = p / jnp.where(total > 0, total, 1.0)
    logq = jax.nn.log_softmax(jnp.where(entry_mask, index_scores, -jnp.inf), axis=-1)
    logq = jnp.where(entry_mask, logq, 0.0)
    logp = jnp.log(jnp.where(p > 0, p, 1.0))
    kl = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    return jnp.sum(kl * has) / jnp.maximum(jnp.sum(has), 1)


def layer_routing_stats(info: dict, layer: int, config: ModelConfig, mask: jax.Array) -> dict:
    """What the losses and the bias update need from one layer's routing info (``forward``'s
    ``layer_stats`` hook, so it runs inside the layer and the large per-layer arrays die there).

    Returns ``dropped``, ``load`` [E] (``expert_load``), ``balance`` for learned-router layers and
    ``indexer_kl`` for CSA layers run ``with_aux``. ``layer`` == L is the MTP block.
    """
    out = {"dropped": info["dropped"], "load": expert_load(info["idx"], mask, config.n_routed_experts)}
    if layer >= config.num_hash_layers:
        out["balance"] = balance_loss(info["scores"], info["idx"], mask, config.num_experts_per_tok)
    aux = info.get("attn") or {}
    if config.layer_type(layer) == CSA and "index_scores" in aux:
        out["indexer_kl"] = indexer_kl(aux["index_scores"], aux["entry_probs"], aux["entry_mask"], mask)
    return out


def routing_losses(stats: list[dict]) -> tuple[jax.Array, jax.Array]:
    """Balance loss summed over learned-router layers and indexer KL averaged over the CSA layers
    that have one, from ``layer_routing_stats`` of every layer (main and MTP)."""
    balance = sum((s["balance"] for s in stats if "balance" in s), jnp.zeros((), F32))
    kls = [s["indexer_kl"] for s in stats if "indexer_kl" in s]
    return balance, jnp.mean(jnp.stack(kls)) if kls else jnp.zeros((), F32)


def expert_load(idx: jax.Array, mask: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert: idx [b, s, K], mask [b, s] -> [E] fp32."""
    return jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=F32) * mask[..., None, None].astype(F32), axis=(0, 1, 2))


def update_router_bias(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded ones.
    bias, load [..., E] (leading axes: stacked layers, each balanced on its own)."""
    return bias + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
