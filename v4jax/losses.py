"""DeepSeek-V4 training losses and the aux-loss-free router bias update (spec §4).

* next-token cross-entropy, and the MTP cross-entropy (token t+2) with its weight λ, both through
  ``weighted_nll``: the head and its logsumexp run over chunks of tokens, so the [tokens, vocab]
  logits never exist at once, and each chunk's gradients are computed with its loss;
* the sequence-wise balance loss (V3 form, weight 1e-4);
* the lightning-indexer KL loss (V3.2's DSA form adapted to compressed entries);
* the router bias update b ← b + u·sign(mean load − load), u = 0.001, outside the optimiser.

Choices where the spec says a detail is unpublished:

* **Balance loss scope.** Computed per packed row (a row counts as one sequence) over its real
  tokens, for the layers with a learned router (hash layers choose by token id, so the loss could not
  change their choice), averaged over rows and summed over layers.
* **Indexer target.** p_t is the main attention's probability of each compressed entry, summed over
  heads and renormalised over the entries the query used (the selected top-k in the sparse stage,
  taken from the attention's own softmax; all visible ones in the dense stage, a short-context path
  with [b, s, e] arrays); the KL is taken against the indexer's softmax over the same entries.
  Window keys and the sink are left out of the target: the indexer only ranks compressed entries.
  The target is a constant (stop-gradient) and the indexer's inputs are detached, so the KL
  trains only the indexer and the LM loss never does.
* **Bias update load.** The load is counted over the whole global batch (all hosts), per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.config import CSA, ModelConfig

F32 = jnp.float32


def _nll_chunk(x, w, targets):
    """x [t, d], w [V, d] (both in the matmul dtype), targets [t] -> (logits [t, V], nll [t], logz [t]) in fp32."""
    logits = jnp.einsum("td,vd->tv", x, w, preferred_element_type=F32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logits, logz - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0], logz


def _in_chunks(chunk: int, shards: int, x: jax.Array, *per_token: jax.Array, context: int = 1):
    """x [b, s, d] and arrays [b, s] -> n chunks of the next c positions of every row, [n, b*c, d]
    and [n, b*c] (positions zero padded to n*c), c such that a chunk is about ``chunk`` tokens per
    batch shard (``shards``: the devices the rows are split over).

    Chunks run along the sequence, never across rows: with the rows split over devices (the batch
    axes), every device takes its own rows' share of every chunk. (Chunks of consecutive tokens of
    the flattened batch lay along the split rows, so a loop over them made every device gather the
    whole batch and compute the head for all of it.) With the tokens split over ``context``
    devices (and s divisible), each row's slices count as rows: a chunk takes the next positions of
    every slice, so each device again works on its own tokens.
    """
    b, s, d = x.shape
    k = _slices(context, s)
    if k > 1:
        x, per_token = _slices_as_rows(k, x), tuple(_slices_as_rows(k, a) for a in per_token)
        b, s, shards = b * k, s // k, shards * k
    c = max(1, min(s, chunk * shards // b))
    n = -(-s // c)

    def cut(a):  # [b, s, ...] -> [n, b*c, ...]
        a = jnp.pad(a, ((0, 0), (0, n * c - s)) + ((0, 0),) * (a.ndim - 2)).reshape((b, n, c) + a.shape[2:])
        return jnp.swapaxes(a, 0, 1).reshape((n, b * c) + a.shape[3:])

    return (cut(x), *(cut(a) for a in per_token))


def _slices(context: int, s: int) -> int:
    """How many slices of a row the chunks treat as rows: ``context`` where it divides s, else 1."""
    return context if context > 1 and s % context == 0 else 1


def _slices_as_rows(context: int, a: jax.Array) -> jax.Array:
    """[b, s, ...] -> [b * context, s / context, ...]: each slice of a row as a row."""
    return a.reshape((a.shape[0] * context, a.shape[1] // context) + a.shape[2:])


def _uncut(a: jax.Array, b: int, s: int, context: int = 1) -> jax.Array:
    """``_in_chunks``' [n, b*c] back to [b, s]."""
    k = _slices(context, s)
    rows, length = b * k, s // k
    n = a.shape[0]
    return jnp.swapaxes(a.reshape(n, rows, -1), 0, 1).reshape(rows, -1)[:, :length].reshape(b, s)


@jax.named_scope("lm_head")
def token_nll(x: jax.Array, w: jax.Array, targets: jax.Array, chunk: int = 4096, shards: int = 1,
              context: int = 1) -> jax.Array:
    """-log softmax(x @ w^T)[target] of every token, without the [tokens, V] logits: for evaluation.

    x [b, s, d] (the final normed hidden state; the matmuls run in its dtype with fp32 accumulation,
    so fp32 x is the exact fp32 path), w [V, d] (the head), targets [b, s] -> nll [b, s] fp32.
    Tokens go through the head and an fp32 logsumexp a chunk at a time: the next positions of every
    row, about ``chunk`` tokens per batch shard (``shards``: the devices the rows are split over;
    ``context``: the devices each row's tokens are split over). Training differentiates
    ``weighted_nll`` instead, which computes its gradients during the forward pass.
    """
    b, s, _ = x.shape
    return _uncut(_chunked_nll(*_in_chunks(chunk, shards, x, targets, context=context), w), b, s, context)


def _chunked_nll(x, targets, w):
    """x [n, c, d], targets [n, c] -> nll [n, c], one chunk at a time."""
    wc = w.astype(x.dtype)
    return jax.lax.map(lambda a: _nll_chunk(a[0], wc, a[1])[1], (x, targets))


@jax.named_scope("lm_head")
def weighted_nll(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int = 4096,
                 shards: int = 1, context: int = 1) -> jax.Array:
    """sum_t weights[t] * nll[t] (a scalar, fp32) with ``token_nll``'s nll; the training loss.

    x [b, s, d], w [V, d], targets, weights [b, s] (e.g. mask / number of tokens: a masked mean);
    chunks as in ``token_nll``. Under differentiation each chunk's gradients are computed as soon
    as its logits are: the softmax gradient (p - onehot(target)) * weight, in x's dtype, times the
    head gives the hidden states' gradient, and times the chunk's hidden states adds to the head's
    (fp32). The backward pass only scales them by the loss's cotangent, so the head's [tokens, V]
    product runs three times per step instead of four (no recomputed logits) and nothing of size
    [tokens, V] is kept.
    """
    xs, ts, ws = _in_chunks(chunk, shards, x, targets, weights.astype(F32), context=context)
    return _weighted_nll(xs, w, ts, ws)


@jax.custom_vjp
def _weighted_nll(x, w, targets, weights):  # x [n, c, d]; targets, weights [n, c]
    return jnp.sum(_chunked_nll(x, targets, w) * weights)


def _weighted_nll_fwd(x, w, targets, weights):
    wc = w.astype(x.dtype)

    def step(dw, a):
        xc, tc, sc = a
        logits, nll, logz = _nll_chunk(xc, wc, tc)
        dlogits = (jnp.exp(logits - logz[:, None]) - jax.nn.one_hot(tc, w.shape[0], dtype=F32)) * sc[:, None]
        dlogits = dlogits.astype(x.dtype)
        dx = jnp.einsum("tv,vd->td", dlogits, wc, preferred_element_type=F32).astype(x.dtype)
        return dw + jnp.einsum("tv,td->vd", dlogits, xc, preferred_element_type=F32), (nll, dx)

    dw, (nll, dx) = jax.lax.scan(step, jnp.zeros(w.shape, F32), (x, targets, weights))
    return jnp.sum(nll * weights), (dx, dw.astype(w.dtype), nll)


def _weighted_nll_bwd(res, g):
    dx, dw, nll = res
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, g * nll


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of values [b, s] over the positions where mask [b, s] is set."""
    mask = mask.astype(F32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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

    index_scores, entry_probs [b, s, k]; entry_mask [b, s, k] bool (slot k holds an entry the query
    used: the selected ones, or every entry in the dense stage); mask [b, s] (real tokens).
    """
    total, count = indexer_kl_sum(index_scores, entry_probs, entry_mask, mask)
    return total / jnp.maximum(count, 1.0)


def indexer_kl_sum(index_scores: jax.Array, entry_probs: jax.Array, entry_mask: jax.Array,
                   mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``indexer_kl``'s sum over queries and the number of queries (fp32 scalars), so that the
    micro-batches of one update can be averaged as one batch."""
    p = jax.lax.stop_gradient(entry_probs) * entry_mask
    total = jnp.sum(p, axis=-1, keepdims=True)
    has = (total[..., 0] > 0) & (mask > 0)
    p = p / jnp.where(total > 0, total, 1.0)
    logq = jax.nn.log_softmax(jnp.where(entry_mask, index_scores, -jnp.inf), axis=-1)
    logq = jnp.where(entry_mask, logq, 0.0)
    logp = jnp.log(jnp.where(p > 0, p, 1.0))
    kl = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    return jnp.sum(kl * has), jnp.sum(has).astype(F32)


def layer_routing_stats(info: dict, layer: int, config: ModelConfig, mask: jax.Array) -> dict:
    """What the losses and the bias update need from one layer's routing info (``forward``'s
    ``layer_stats`` hook, so it runs inside the layer and the large per-layer arrays die there).

    Returns ``dropped``, ``load`` [E] (``expert_load``), ``balance`` for learned-router layers and
    ``kl_sum``, ``kl_count`` (``indexer_kl_sum``) for CSA layers run ``with_aux``. ``layer`` == L is
    the MTP block.
    """
    out = {"dropped": info["dropped"], "load": expert_load(info["idx"], mask, config.n_routed_experts)}
    if layer >= config.num_hash_layers:
        out["balance"] = balance_loss(info["scores"], info["idx"], mask, config.num_experts_per_tok)
    aux = info.get("attn") or {}
    if config.layer_type(layer) == CSA and "index_scores" in aux:
        out["kl_sum"], out["kl_count"] = indexer_kl_sum(aux["index_scores"], aux["entry_probs"], aux["entry_mask"],
                                                        mask)
    return out


def routing_losses(stats: list[dict]) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Balance loss summed over learned-router layers, and the indexer KL sums and query counts of
    the CSA layers that have one (the loss is the mean over them of sum / count), from
    ``layer_routing_stats`` of every layer (main and MTP)."""
    balance = sum((s["balance"] for s in stats if "balance" in s), jnp.zeros((), F32))
    kls = [s for s in stats if "kl_sum" in s]
    return balance, [s["kl_sum"] for s in kls], [s["kl_count"] for s in kls]


def expert_load(idx: jax.Array, mask: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert: idx [b, s, K], mask [b, s] -> [E] fp32."""
    return jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=F32) * mask[..., None, None].astype(F32), axis=(0, 1, 2))


def update_router_bias(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded ones.
    bias, load [..., E] (leading axes: stacked layers, each balanced on its own)."""
    return bias + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
