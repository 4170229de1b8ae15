"""Long-context attention (spec §2.6): the index-list attention and the chunked lightning indexer.

* at 8K tokens (tiny dims, the release's ratios 4 and 128, window 128, packed documents) the
  attention of every layer kind and its indexer loss equal the dense masked reference
  (``tests/dense_reference.py``, the form v4jax used before), and chunk sizes change nothing;
* the indexer's running top-k against numpy's sort, the index-list softmax against the spec's
  formula written out in numpy, per query;
* compile only: the temporary memory of the training loss and its gradient grows linearly with the
  sequence (at most ~5x for 4x the tokens), where the dense stage's grows with its square.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import dense_reference
from tests.helpers import rel, sharpened
from v4jax.attention import attention, indexer_topk
from v4jax.config import ModelConfig
from v4jax.index_list import Entries, sparse_attention
from v4jax.losses import indexer_kl
from v4jax.model import init_params, param_specs
from v4jax.parallel import ParallelConfig
from v4jax.trainer import TrainConfig, loss_fn

TOLERANCE = 1e-5  # max |ours - ref| / max |ref|, fp32

LONG = ModelConfig.from_dict(dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=3, layer_types=("swa", "csa", "hca"),
    compress_rates={"csa": 4, "hca": 128}, sliding_window=128, num_attention_heads=2, head_dim=16,
    qk_rope_head_dim=8, q_lora_rank=16, o_groups=1, o_lora_rank=8, index_n_heads=4, index_head_dim=16,
    index_topk=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, hc_mult=2,
    num_hash_layers=0, num_nextn_predict_layers=1))

SEQ = 8192
DOCS = (3001, 129, 4000, 1062)  # packed; lengths cross windows and both block sizes


@pytest.fixture(scope="module")
def long_inputs():
    params = sharpened(init_params(LONG, seed=0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, SEQ, LONG.hidden_size)), jnp.float32)
    positions = np.concatenate([np.arange(n) for n in DOCS])[None].astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOCS)])[None].astype(np.int32)
    return params, x, jnp.asarray(positions), jnp.asarray(segments)


def _kl(aux, segments):
    return indexer_kl(aux["index_scores"], aux["entry_probs"], aux["entry_mask"], segments > 0)


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["swa", "csa", "hca"])
def test_attention_at_8k_tokens_equals_the_dense_reference(long_inputs, layer):
    params, x, positions, segments = long_inputs
    p = params["layers"][layer]["attn"]
    run = jax.jit(lambda x, pos, seg: dense_reference.attention(x, p, LONG, layer, pos, seg, True, True))
    want, want_aux = run(x, positions, segments)
    outs = {}  # (attention chunk, indexer key chunk, csa_mask_ratio): the last one takes CSA's mask path
    for chunks in ((512, 4096, 4), (128, 256, 4), (2048, 1 << 14, 4), (512, 4096, 64)):
        par = ParallelConfig(attention_chunk=chunks[0], indexer_key_chunk=chunks[1], csa_mask_ratio=chunks[2])
        run = jax.jit(lambda x, pos, seg, par=par: attention(x, p, LONG, layer, pos, seg, True, True, par))
        outs[chunks] = run(x, positions, segments)
    got, aux = outs[(512, 4096, 4)]
    assert rel(got, want) <= TOLERANCE
    if layer == 1:  # CSA: the indexer loss over the selected entries is the dense one
        assert rel(_kl(aux, segments), _kl(want_aux, segments)) <= TOLERANCE
        assert aux["entry_mask"].shape == (1, SEQ, LONG.index_topk)
        assert int(jnp.sum(aux["entry_mask"])) == int(jnp.sum(want_aux["entry_mask"]))  # same number of picks
    for chunks, (o, a) in outs.items():  # chunk sizes and the mask path change no result
        assert rel(o, got) <= 1e-6, chunks
        for key in a:
            np.testing.assert_array_equal(np.isfinite(a[key]), np.isfinite(aux[key]))
            if key != "entry_mask":
                assert rel(jnp.where(jnp.isfinite(a[key]), a[key], 0), jnp.where(jnp.isfinite(aux[key]), aux[key], 0)
                           ) <= 1e-6, (chunks, key)


@pytest.mark.parametrize("layer,mask_ratio", [(0, 4), (1, 4), (1, 16), (2, 4)],
                         ids=["swa", "csa", "csa-as-mask", "hca"])
def test_attention_gradient_equals_the_dense_reference(long_inputs, layer, mask_ratio):
    """Gradients of a projection of the output (plus the indexer loss on CSA) with respect to the
    input and every parameter, through the hand-written backward passes of the listed entries
    (at 2K tokens CSA has 16 x index_topk entries: mask_ratio 16 takes the mask path instead)."""
    params, x, positions, segments = long_inputs
    s = 2048
    x, positions, segments = x[:, :s], positions[:, :s], segments[:, :s]
    proj = jnp.asarray(np.random.default_rng(5).normal(size=(1, s, LONG.hidden_size)), jnp.float32)

    def loss(fn, x, p):
        out, aux = fn(x, p, LONG, layer, positions, segments, True, True)
        return jnp.sum(out * proj) + (_kl(aux, segments) if aux else 0.0)

    p = params["layers"][layer]["attn"]
    par = ParallelConfig(csa_mask_ratio=mask_ratio)
    want = jax.jit(jax.grad(lambda x, p: loss(dense_reference.attention, x, p), argnums=(0, 1)))(x, p)
    got = jax.jit(jax.grad(lambda x, p: loss(functools.partial(attention, parallel=par), x, p), argnums=(0, 1)))(x, p)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        if np.abs(np.asarray(r)).max() == 0:
            assert np.abs(np.asarray(g)).max() == 0, path
        else:
            assert rel(g, r) <= TOLERANCE, (jax.tree_util.keystr(path), rel(g, r))


def _np_visible(seg_q, pos_q, entries):
    return (entries["valid"][None] & (entries["seg"][None] == seg_q[:, None])
            & (entries["last"][None] <= pos_q[:, None]))


def _random_layout(rng, lengths):
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    return pos, seg


def _random_entries(rng, pos, seg, m, c):
    """Entries of m-token blocks of each document (as v4jax lays them out), with random keys."""
    starts = [t for t in range(len(pos)) if pos[t] % m == 0 and t + m <= len(pos) and seg[t + m - 1] == seg[t]]
    e = len(pos) // m
    valid = np.arange(e) < len(starts)
    start = np.zeros(e, np.int32)
    start[: len(starts)] = starts
    return {"keys": rng.normal(size=(e, c)), "seg": seg[start], "last": pos[start] + m - 1,
            "last_row": start + m - 1, "valid": valid}


def _as_entries(entries):
    return Entries(*(jnp.asarray(entries[k][None]) for k in ("keys", "seg", "last", "last_row", "valid")))


@pytest.mark.parametrize("query_chunk,key_chunk", [(7, 5), (64, 16), (1000, 1000)])
def test_indexer_topk_matches_a_full_sort(query_chunk, key_chunk):
    """The running top-k over blocks of entries picks, per query, the k best-scored visible entries
    of a full numpy sort (lower index first among equal scores; -1 for empty slots)."""
    rng = np.random.default_rng(1)
    pos, seg = _random_layout(rng, [230, 3, 167])
    s, h, c, m, k = len(pos), 3, 8, 4, 6
    entries = _random_entries(rng, pos, seg, m, c)
    entries["keys"][1::4] = entries["keys"][::4][: len(entries["keys"][1::4])]  # equal keys: exact ties
    q = rng.normal(size=(s, h, c)).astype(np.float32)
    w = rng.normal(size=(s, h)).astype(np.float32)
    entries["keys"] = entries["keys"].astype(np.float32)
    vis = _np_visible(seg, pos, entries)
    got = indexer_topk(jnp.asarray(q[None], jnp.float32), jnp.asarray(w[None], jnp.float32), _as_entries(entries),
                       jnp.asarray(seg[None]), jnp.asarray(pos[None]), k, query_chunk=query_chunk,
                       key_chunk=key_chunk)
    got = np.asarray(got[0])
    q, w, keys = (a.astype(np.float64) for a in (q, w, entries["keys"]))
    scores = np.einsum("sh,she->se", w, np.maximum(np.einsum("shc,ec->she", q, keys), 0))
    for t in range(s):
        order = [i for i in np.lexsort((np.arange(len(vis[t])), -scores[t])) if vis[t, i]][:k]
        want = sorted(order) + [-1] * (k - len(order))
        assert sorted(got[t]) == sorted(want), t
    assert (got == -1).any() and (got >= 0).any()


def _np_index_list_attention(q, kv, sink, seg, pos, window, entries, idx):
    """Spec §2.6.5 per query: keys = window rows of the document + the listed (or visible) entries."""
    s, h, c = q.shape
    out, probs = np.zeros((s, h, c)), []
    for t in range(s):
        rows = [u for u in range(max(0, t - window + 1), t + 1) if seg[u] == seg[t]]
        if idx is None:
            listed = [i for i in range(len(entries["valid"])) if _np_visible(seg[t:t + 1], pos[t:t + 1], entries)[0, i]]
        else:
            listed = [i for i in idx[t] if i >= 0]
        keys = np.concatenate([kv[rows], entries["keys"][listed]])
        logits = np.einsum("hc,jc->hj", q[t], keys) / np.sqrt(c)
        mx = np.maximum(logits.max(-1), sink)
        p = np.exp(logits - mx[:, None])
        p = p / (p.sum(-1) + np.exp(sink - mx))[:, None]
        out[t] = p @ keys
        slot_p = p[:, len(rows):].sum(0)
        full = np.zeros(idx.shape[1] if idx is not None else len(entries["valid"]))
        if idx is None:
            full[listed] = slot_p
        else:
            full[np.nonzero(idx[t] >= 0)[0]] = slot_p
        probs.append(full)
    return out, np.stack(probs)


@pytest.mark.parametrize("explicit,mask_ratio", [(True, 0), (True, 8), (False, 0)],
                         ids=["listed entries (CSA)", "listed entries as a mask (CSA)", "every visible entry (HCA)"])
def test_index_list_attention_matches_the_formula(explicit, mask_ratio):
    rng = np.random.default_rng(2)
    pos, seg = _random_layout(rng, [29, 2, 40])
    s, h, c, window, m = len(pos), 3, 8, 8, 4
    entries = _random_entries(rng, pos, seg, m, c)
    q, kv, sink = rng.normal(size=(s, h, c)) * 2, rng.normal(size=(s, c)), rng.normal(size=h)
    idx = None
    if explicit:
        vis = _np_visible(seg, pos, entries)
        idx = np.full((s, 3), -1)
        for t in range(s):
            choice = rng.permutation(np.nonzero(vis[t])[0])[:3]
            idx[t, : len(choice)] = choice
    want, want_p = _np_index_list_attention(q, kv, sink, seg, pos, window, entries, idx)
    for chunk in (1, 16, 100):
        got, got_p = sparse_attention(
            jnp.asarray(q[None], jnp.float32), jnp.asarray(kv[None], jnp.float32), jnp.asarray(sink, jnp.float32),
            jnp.asarray(seg[None]), jnp.asarray(pos[None]), window, _as_entries(entries),
            None if idx is None else jnp.asarray(idx[None], jnp.int32), query_chunk=chunk, with_probs=True,
            mask_ratio=mask_ratio)
        assert rel(got[0], want) <= TOLERANCE
        assert rel(got_p[0], want_p) <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# Memory that scales (compile only)


def _temp_bytes(seq, sparse, grad):
    cfg = TrainConfig(attention="sparse" if sparse else "dense")
    par = ParallelConfig()
    batch = {k: jax.ShapeDtypeStruct((1, seq), jnp.float32 if "mask" in k else jnp.int32)
             for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask", "mtp_targets", "mtp_mask")}

    def loss(params, b):
        return loss_fn(params, b, LONG, cfg, 0, par)[0]

    fn = jax.grad(loss) if grad else loss
    compiled = jax.jit(fn).lower(param_specs(LONG, scan=True), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_memory_grows_linearly_with_the_sequence(grad):
    """4x the tokens (2K -> 8K) costs at most ~5x the temporaries in the sparse training loss; the
    dense stage (the [b, s, e] indexer scores of its KL) shows that the measurement sees quadratic
    growth."""
    small, large = _temp_bytes(2048, True, grad), _temp_bytes(8192, True, grad)
    assert large <= 5 * small, (small, large)
    dense_small, dense_large = _temp_bytes(2048, False, grad), _temp_bytes(8192, False, grad)
    assert dense_large > 8 * dense_small, (dense_small, dense_large)


@pytest.mark.parametrize("e", [4, 64])  # h e <= k c: the spread form; else the per-slot rows
def test_listed_products_have_the_gradients_of_the_gather(e):
    from v4jax.index_list import listed_combine, listed_dot  # noqa: PLC0415

    b, q, h, k, c = 2, 5, 2, 3, 4
    rng = np.random.default_rng(e)
    idx = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(q)]) for _ in range(b)]).astype(np.int32)
    idx[:, ::2, -1] = -1  # empty slots
    shapes = ((b, q, h, c), (b, e, c), (b, q, h, k))
    qs, keys, p = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)
    ok = jnp.asarray(idx >= 0)[:, :, None, :]
    take = lambda kv: jax.vmap(lambda kb, i: kb[i])(kv, jnp.maximum(idx, 0))  # noqa: E731  (autodiff: scatter-add)
    weights = jnp.asarray(rng.normal(size=(b, q, h, k)), jnp.float32)
    dot = lambda f: lambda a, kv: jnp.sum(jnp.where(ok, f(a, kv), 0.0) * weights)  # noqa: E731
    ours = jax.grad(dot(lambda a, kv: listed_dot(a, kv, idx)), argnums=(0, 1))(qs, keys)
    ref = jax.grad(dot(lambda a, kv: jnp.einsum("bqhc,bqkc->bqhk", a, take(kv))), argnums=(0, 1))(qs, keys)
    assert max(rel(o, r) for o, r in zip(ours, ref)) <= 1e-6
    pm = jnp.where(ok, p, 0.0)  # probabilities of empty slots are 0
    out_w = jnp.asarray(rng.normal(size=(b, q, h, c)), jnp.float32)
    comb = lambda f: lambda a, kv: jnp.sum(f(a, kv) * out_w)  # noqa: E731
    ours = jax.grad(comb(lambda a, kv: listed_combine(a, kv, idx)), argnums=(0, 1))(pm, keys)
    ref = jax.grad(comb(lambda a, kv: jnp.einsum("bqhk,bqkc->bqhc", a, take(kv))), argnums=(0, 1))(pm, keys)
    assert rel(ours[1], ref[1]) <= 1e-6
    assert rel(jnp.where(ok, ours[0], 0.0), jnp.where(ok, ref[0], 0.0)) <= 1e-6  # empty slots' p are not read
