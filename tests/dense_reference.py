"""The dense masked attention v4jax used before the index-list form, kept as a test reference only.

It computes CSA as a score matrix over every compressed entry with a [b, s, e] mask (the indexer's
top-k scattered into it) and the lightning indexer's [b, s, e] scores at once, so its memory grows
with the square of the sequence. It is the straightforward form of spec §2.6.5, which the
index-list attention in ``v4jax.attention`` must reproduce.
"""

import jax
import jax.numpy as jnp

from v4jax.attention import compress, compressed_entries
from v4jax.config import CSA, SWA, ModelConfig
from v4jax.layers import F32, apply_rope, linear, linear_f32, rms_norm, rope_angles, rope_frequencies

NEG_INF = -jnp.inf


def _entries(x, p, positions, segment_ids, m, overlap, freqs, eps):
    """Compressed keys [b, n, c] with RoPE at the block's first position, and visibility [b, s, n]."""
    start, valid = compressed_entries(positions, segment_ids, m)
    block_pos = jnp.take_along_axis(positions, start, axis=1)  # = block index * m
    entries = compress(x, p, start, block_pos == 0, m, overlap, eps)
    entries = apply_rope(entries, *rope_angles(freqs, block_pos))
    entry_seg = jnp.take_along_axis(segment_ids, start, axis=1)
    # query t may use entry w of its own document iff the block ended at or before t
    visible = (
        valid[:, None, :]
        & (entry_seg[:, None, :] == segment_ids[:, :, None])
        & (block_pos[:, None, :] // m < (positions[:, :, None] + 1) // m)
    )
    return entries, visible


def indexer_select(x, cq, p, positions, segment_ids, config: ModelConfig, freqs, m):
    """Lightning indexer: which compressed entries each query uses.

    I[t, w] = sum_h wI[t, h] * relu(qI[t, h] . KI[w]) over visible w; keep the top index_topk.
    Scores are computed in fp32. The indexer's inputs are detached: the selection carries no
    gradient, and the indexer's own training loss (``v4jax.losses.indexer_kl``) reaches only its
    parameters. Returns (selected [b, s, n] bool, scores [b, s, n] fp32 with -inf where not visible).
    """
    x, cq = jax.lax.stop_gradient(x), jax.lax.stop_gradient(cq)
    b, s, _ = x.shape
    keys, visible = _entries(x, p["compressor"], positions, segment_ids, m, True, freqs, config.rms_norm_eps)
    hi, ci = config.index_n_heads, config.index_head_dim
    q = linear(cq, p["wq_b"]).reshape(b, s, hi, ci)
    q = apply_rope(q, *rope_angles(freqs, positions))
    weights = linear_f32(x, p["weights_proj"]) * (ci**-0.5 * hi**-0.5)  # [b, s, hi]
    dots = jnp.einsum("bshc,bnc->bshn", q.astype(F32), keys.astype(F32))
    scores = jnp.einsum("bsh,bshn->bsn", weights, jax.nn.relu(dots))
    scores = jnp.where(visible, scores, NEG_INF)
    k = min(config.index_topk, keys.shape[1])
    _, top = jax.lax.top_k(jax.lax.stop_gradient(scores), k)  # [b, s, k]
    picked = jnp.zeros(scores.shape, bool)
    picked = jax.vmap(jax.vmap(lambda row, idx: row.at[idx].set(True)))(picked, top)
    return picked & visible, scores  # picks that landed on masked entries are dropped


def _window_keys(kv: jax.Array, chunk: int):
    """kv [b, S, c] (S a multiple of chunk) -> keys of chunk u and u-1: [b, u, 2*chunk, c]."""
    b, S, c = kv.shape
    k = kv.reshape(b, S // chunk, chunk, c)
    prev = jnp.pad(k, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    return jnp.concatenate([prev, k], axis=2)


def core_attention(q, kv, sink, window, segment_ids, entries=None, entry_mask=None, entry_probs=False):
    """One softmax over window keys, compressed entries and the sink; value = key.

    q: [b, s, h, c]; kv: [b, s, c]; sink: [h] (an fp32 logit, not scaled); segment_ids: [b, s];
    entries: [b, n, c] with entry_mask [b, s, n] (True = used). Returns [b, s, h, c] in q's dtype,
    and with ``entry_probs`` also the attention probability of each entry summed over heads [b, s, n].
    Window: query t sees key u iff 0 <= t - u < window and both are in the same document.
    """
    b, s, h, c = q.shape
    scale = c**-0.5
    chunk = min(window, s)
    S = -(-s // chunk) * chunk
    pad = ((0, 0), (0, S - s))
    qc = jnp.pad(q, pad + ((0, 0), (0, 0))).reshape(b, S // chunk, chunk, h, c)
    keys = _window_keys(jnp.pad(kv, pad + ((0, 0),)), chunk)  # [b, u, 2*chunk, c]
    seg = jnp.pad(segment_ids, pad, constant_values=-1)
    key_seg = _window_keys(seg[..., None], chunk)[..., 0]  # [b, u, 2*chunk]

    t = jnp.arange(S).reshape(S // chunk, chunk)  # query index per (u, w)
    src = t[:, :1] - chunk + jnp.arange(2 * chunk)  # key index per (u, j)
    dist = t[:, :, None] - src[:, None, :]  # [u, w, j]
    win_ok = (dist >= 0) & (dist < window) & (src[:, None, :] >= 0)
    win_ok = win_ok[None] & (seg.reshape(b, S // chunk, chunk)[..., None] == key_seg[:, :, None, :])

    logits = jnp.einsum("buwhc,bujc->buwhj", qc, keys, preferred_element_type=F32) * scale
    logits = jnp.where(win_ok[:, :, :, None, :], logits, NEG_INF)
    m = jnp.maximum(jnp.max(logits, axis=-1), sink.astype(F32))  # [b, u, w, h]
    if entries is not None and entries.shape[1] > 0:
        cl = jnp.einsum("bshc,bnc->bshn", q, entries, preferred_element_type=F32) * scale
        cl = jnp.where(entry_mask[:, :, None, :], cl, NEG_INF)
        cl = jnp.pad(cl, pad + ((0, 0), (0, 0)), constant_values=NEG_INF).reshape(
            b, S // chunk, chunk, h, -1)
        m = jnp.maximum(m, jnp.max(cl, axis=-1))
    m = jax.lax.stop_gradient(m)
    p_win = jnp.exp(logits - m[..., None])
    denom = jnp.sum(p_win, axis=-1) + jnp.exp(sink.astype(F32) - m)
    if entries is not None and entries.shape[1] > 0:
        p_cmp = jnp.exp(cl - m[..., None])
        denom = denom + jnp.sum(p_cmp, axis=-1)
    inv = (1.0 / denom)[..., None]
    out = jnp.einsum("buwhj,bujc->buwhc", (p_win * inv).astype(q.dtype), keys, preferred_element_type=F32)
    if entries is not None and entries.shape[1] > 0:
        out = out + jnp.einsum("buwhn,bnc->buwhc", (p_cmp * inv).astype(q.dtype), entries,
                               preferred_element_type=F32)
    out = out.reshape(b, S, h, c)[:, :s].astype(q.dtype)
    if not entry_probs:
        return out
    mass = jnp.sum(p_cmp * inv, axis=3).reshape(b, S, -1)[:, :s]
    return out, mass


def attention(x: jax.Array, p: dict, config: ModelConfig, layer: int, positions: jax.Array,
              segment_ids: jax.Array, sparse: bool = True, with_aux: bool = False):
    """x: [b, s, d] (the attn_norm output) -> [b, s, d]. ``layer`` == L selects the MTP layer's type.

    ``sparse=False`` lets CSA queries use every visible compressed entry (the dense training stage).
    ``with_aux`` also returns a dict; for CSA layers it holds what the indexer loss needs:
    ``index_scores`` [b, s, n], ``entry_mask`` [b, s, n] (entries the queries used) and
    ``entry_probs`` [b, s, n] (main-attention probability of each entry, summed over heads).
    """
    b, s, _ = x.shape
    h, c, eps = config.num_attention_heads, config.head_dim, config.rms_norm_eps
    kind, m = config.layer_type(layer), config.layer_ratio(layer)
    freqs = rope_frequencies(config, layer)
    cos, sin = rope_angles(freqs, positions)

    cq = rms_norm(linear(x, p["wq_a"]), p["q_norm"], eps)  # [b, s, q_lora_rank]
    q = rms_norm(linear(cq, p["wq_b"]).reshape(b, s, h, c), None, eps)  # weight-free per-head norm
    q = apply_rope(q, cos, sin)
    kv = apply_rope(rms_norm(linear(x, p["wkv"]), p["kv_norm"], eps), cos, sin)  # [b, s, c], K = V

    entries = entry_mask = None
    aux = {}
    if kind != SWA:
        entries, entry_mask = _entries(x, p["compressor"], positions, segment_ids, m, kind == CSA, freqs, eps)
        if kind == CSA and entries.shape[1] > 0 and (sparse or with_aux):
            selected, aux["index_scores"] = indexer_select(x, cq, p["indexer"], positions, segment_ids, config,
                                                           freqs, m)
            entry_mask = selected if sparse else entry_mask
            aux["entry_mask"] = entry_mask

    want_probs = "index_scores" in aux
    o = core_attention(q, kv, p["attn_sink"], config.sliding_window, segment_ids, entries, entry_mask,
                       entry_probs=want_probs)
    if want_probs:
        o, aux["entry_probs"] = o
    o = apply_rope(o, cos, sin, inverse=True)  # de-rotate at the query position

    g = config.o_groups
    wa = p["wo_a"].reshape(g, config.o_lora_rank, -1).astype(x.dtype)  # [g, d_g, h*c/g]
    z = jnp.einsum("bsgi,gri->bsgr", o.reshape(b, s, g, -1), wa)
    out = linear(z.reshape(b, s, -1), p["wo_b"])
    return (out, aux) if with_aux else out
