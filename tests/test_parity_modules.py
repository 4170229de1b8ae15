"""Per-module parity with transformers' DeepSeek-V4 modules (PyTorch, CPU, fp32).

Each module gets the same random input on both sides and the weights that ``from_pretrained`` read
from the reference's ``save_pretrained`` directory. Tolerance: max |ours - ref| / max |ref| <= 1e-5.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import v4jax
from tests import hf_oracle
from tests.helpers import CONFIGS, SEQ, rel
from v4jax.attention import attention
from v4jax.config import SWA
from v4jax.layers import rope_frequencies
from v4jax.mhc import hc_head, hc_post, hc_pre, sinkhorn
from v4jax.moe import moe

TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    config = CONFIGS[name]
    directory = tmp_path_factory.mktemp(f"ref_{name}")
    reference = hf_oracle.make_reference(config, seed=3, directory=directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = v4jax.from_pretrained(directory, dtype="float32")
    return name, config, reference, model


def test_rope_frequencies(case):
    _, config, reference, _ = case
    rotary = reference.model.rotary_emb
    for layer in range(config.num_hidden_layers):
        kind = "main" if config.layer_type(layer) == SWA else "compress"
        want = getattr(rotary, f"{kind}_inv_freq").numpy()
        assert rel(rope_frequencies(config, layer), want) <= 1e-6, (layer, kind)


def test_hyper_connection_pre(case):
    _, config, reference, model = case
    x = torch.randn(2, 7, config.hc_mult, config.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(reference.model.layers):
        with torch.no_grad():
            post, comb, collapsed = layer.attn_hc(x)
        got = hc_pre(jnp.asarray(x.numpy()), model.params["layers"][i]["hc_attn"],
                     sinkhorn_iters=config.hc_sinkhorn_iters, hc_eps=config.hc_eps, norm_eps=config.rms_norm_eps)
        for g, w in zip(got, (collapsed, post, comb)):
            assert rel(g, w.numpy()) <= TOLERANCE


def test_hyper_head(case):
    _, config, reference, model = case
    x = torch.randn(2, 5, config.hc_mult, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference.model.hc_head(x).numpy()
    got = hc_head(jnp.asarray(x.numpy()), model.params["hc_head"], hc_eps=config.hc_eps, norm_eps=config.rms_norm_eps)
    assert rel(got, want) <= TOLERANCE


def test_attention(case):
    name, config, reference, model = case
    s = SEQ[name]
    tokens = np.zeros((2, s), np.int64)
    kw = hf_oracle.layer_inputs(reference, tokens)
    x = torch.randn(2, s, config.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = jnp.broadcast_to(jnp.arange(s), (2, s))
    segments = jnp.zeros((2, s), jnp.int32)
    for i, layer in enumerate(reference.model.layers):
        if config.layer_type(i) != SWA:  # the indexer must not hinge on tied scores
            hf_oracle.assert_no_topk_ties(_indexer_scores(layer, x, kw), config.index_topk,
                                          config.ratio[config.layer_type(i)])
        with torch.no_grad():
            want = layer.self_attn(x, kw["position_embeddings"], kw["position_ids"], kw["attention_mask"])[0]
        run = jax.jit(attention, static_argnums=(2, 3))
        got, _ = run(jnp.asarray(x.numpy()), model.params["layers"][i]["attn"], config, i, positions, segments)
        assert rel(got, want.numpy()) <= TOLERANCE, f"layer {i} ({config.layer_type(i)})"


def _indexer_scores(layer, x, kw):
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.numpy().copy()))
             for n, m in layer.named_modules() if n.endswith("indexer.scorer")]
    with torch.no_grad():
        layer.self_attn(x, kw["position_embeddings"], kw["position_ids"], kw["attention_mask"])
    for h in hooks:
        h.remove()
    return seen


def test_moe(case):
    name, config, reference, model = case
    rng = np.random.default_rng(4)
    ids = rng.integers(0, config.vocab_size, size=(2, 9))
    x = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    for i, layer in enumerate(reference.model.layers):
        with torch.no_grad():
            want = layer.mlp(x, input_ids=torch.as_tensor(ids)).numpy()
        got, _ = moe(jnp.asarray(x.numpy()), model.params["layers"][i]["ffn"], jnp.asarray(ids), config)
        assert rel(got, want) <= TOLERANCE, f"layer {i}"
        # two tokens: fewer (token, choice) pairs than experts, the gathered path (moe.gathered_experts)
        assert 2 * config.num_experts_per_tok < config.n_routed_experts
        with torch.no_grad():
            want = layer.mlp(x[:1, :2], input_ids=torch.as_tensor(ids[:1, :2])).numpy()
        got, _ = moe(jnp.asarray(x[:1, :2].numpy()), model.params["layers"][i]["ffn"], jnp.asarray(ids[:1, :2]), config)
        assert rel(got, want) <= TOLERANCE, f"layer {i}, two tokens"


# --------------------------------------------------------------------------------------------------
# mHC against the spec's formulas, written out in numpy


def _np_sinkhorn(logits, iters, eps):
    """Spec §2.3 / official code: row softmax + eps, column pass, then iters-1 (row, column) pairs."""
    m = np.exp(logits - logits.max(-1, keepdims=True))
    m = m / m.sum(-1, keepdims=True) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdims=True) + eps)
        m = m / (m.sum(-2, keepdims=True) + eps)
    return m


def test_sinkhorn_matches_spec_and_is_doubly_stochastic():
    logits = np.random.default_rng(0).normal(0, 1, size=(5, 4, 4))
    got = np.asarray(sinkhorn(jnp.asarray(logits, jnp.float32), 20, 1e-6))
    assert rel(got, _np_sinkhorn(logits, 20, 1e-6)) <= 1e-5
    np.testing.assert_allclose(got.sum(-2), 1.0, atol=1e-5)  # the last pass normalises columns
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-3)  # rows converge for logits of unit scale
    assert (got > 0).all()


def test_residual_mix_is_transposed():
    """out[k] = post[k] f + sum_j comb[j, k] x[j]: destination k sums over sources j (spec §2.2)."""
    rng = np.random.default_rng(1)
    b, s, n, d = 2, 3, 4, 5
    x, f = rng.normal(size=(b, s, n, d)), rng.normal(size=(b, s, d))
    post, comb = rng.uniform(0, 2, size=(b, s, n)), rng.uniform(0, 1, size=(b, s, n, n))
    want = np.zeros((b, s, n, d))
    for k in range(n):
        want[:, :, k] = post[:, :, k, None] * f + sum(comb[:, :, j, k, None] * x[:, :, j] for j in range(n))
    got = hc_post(*(jnp.asarray(a, jnp.float32) for a in (f, x, post, comb)))
    assert rel(got, want) <= 1e-5
