"""Mixture of experts: sqrt-softplus router, hash routing in the first layers, clamped SwiGLU (spec §2.7).

Shape letters: t tokens (batch and sequence flattened), d model, e experts, k experts per token,
f expert hidden size.

    scores = sqrt(softplus(x @ gate^T))                      # fp32, [t, e]
    idx    = tid2eid[token]            (hash layers)         # [t, k]
           = top_k(scores + bias)      (other layers; the bias only affects selection)
    w      = scores[idx] / sum(scores[idx]) * routed_scaling_factor
    y      = sum_k  w2_e( w_k * silu(min(w1_e x, L)) * clip(w3_e x, -L, L) )  +  shared(x)

The routing weight multiplies the expert hidden state before w2, as the official code does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.config import ModelConfig
from v4jax.layers import F32, linear, linear_f32


def router_scores(x: jax.Array, gate_weight: jax.Array) -> jax.Array:
    """x [..., d] -> sqrt(softplus(logits)) [..., e] in fp32 (torch's softplus, threshold 20)."""
    logits = linear_f32(x, gate_weight)
    return jnp.sqrt(jnp.where(logits > 20.0, logits, jax.nn.softplus(logits)))


def route(x: jax.Array, gate: dict, token_ids: jax.Array, config: ModelConfig):
    """Pick experts and weights. x [t, d], token_ids [t] -> (idx [t, k] int32, weights [t, k] fp32, scores [t, e])."""
    scores = router_scores(x, gate["weight"])
    if "tid2eid" in gate:
        idx = gate["tid2eid"][token_ids].astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + gate["bias"].astype(F32), config.num_experts_per_tok)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True) * config.routed_scaling_factor
    return idx, w, scores


def swiglu_hidden(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """Clamped SwiGLU in fp32: silu(min(gate, L)) * clip(up, -L, L)."""
    gate, up = gate.astype(F32), up.astype(F32)
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


def shared_expert(x: jax.Array, p: dict, limit: float) -> jax.Array:
    """The always-on expert: same clamped SwiGLU, no routing weight. x [..., d] -> [..., d] fp32."""
    hidden = swiglu_hidden(linear(x, p["w1"]), linear(x, p["w3"]), limit)
    return linear(hidden.astype(x.dtype), p["w2"]).astype(F32)


def routed_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, p: dict, limit: float) -> jax.Array:
    """Grouped-matmul reference path: sort token copies by expert and run jax.lax.ragged_dot.

    x [t, d]; idx, weights [t, k]; p {w1 [e, f, d], w3 [e, f, d], w2 [e, d, f]}. Returns [t, d] fp32.
    """
    t, k = idx.shape
    n_experts = p["w1"].shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]  # [t*k, d], grouped by expert
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    w1 = jnp.swapaxes(p["w1"], 1, 2).astype(x.dtype)  # [e, d, f]
    w3 = jnp.swapaxes(p["w3"], 1, 2).astype(x.dtype)
    w2 = jnp.swapaxes(p["w2"], 1, 2).astype(x.dtype)  # [e, f, d]
    hidden = swiglu_hidden(jax.lax.ragged_dot(xs, w1, sizes), jax.lax.ragged_dot(xs, w3, sizes), limit)
    hidden = (hidden * weights.reshape(-1)[order][:, None]).astype(x.dtype)  # weight before w2
    ys = jax.lax.ragged_dot(hidden, w2, sizes).astype(F32)
    out = jnp.zeros_like(ys).at[order].set(ys)  # back to (token, slot) order
    return jnp.sum(out.reshape(t, k, -1), axis=1)


def moe(x: jax.Array, p: dict, token_ids: jax.Array, config: ModelConfig):
    """x [b, s, d] (the ffn_norm output), token_ids [b, s] -> (y [b, s, d] in x.dtype, routing info).

    The routing info (idx [b, s, k], scores [b, s, e]) feeds the balance loss and bias update.
    """
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    idx, w, scores = route(flat, p["gate"], token_ids.reshape(-1), config)
    y = routed_experts(flat, idx, w, p["experts"], config.swiglu_limit)
    y = y + shared_expert(flat, p["shared_experts"], config.swiglu_limit)
    info = {"idx": idx.reshape(b, s, -1), "scores": scores.reshape(b, s, -1)}
    return y.astype(x.dtype).reshape(b, s, d), info
