"""Tests for v4jax.optim: Muon against an independent numpy version of DeepSeek-V4 Algorithm 1,
batching and row-block splitting, the parameter labels and the combined Muon + AdamW optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.helpers import CONFIGS
from v4jax import optim
from v4jax.model import init_params, param_specs

MU, LAMBDA, GAMMA, LR = 0.95, 0.1, 0.18, 0.02
# fp32 Newton-Schulz against a float64 reference: the relative error of each step's update.
RTOL_F32 = 1e-5
# bf16 matmul operands in Newton-Schulz against fp32: relative error of the update.
RTOL_BF16 = 5e-2


# --------------------------------------------------------------------------------------------------
# Independent float64 reference of Algorithm 1 (report §2.4 / spec A.1-A.2)


def ref_newton_schulz(x, jordan_steps=8, stable_steps=2, eps=1e-7):
    x = np.asarray(x, np.float64)
    x = x / (np.sqrt((x * x).sum()) + eps)
    flip = x.shape[0] > x.shape[1]
    if flip:
        x = x.T
    schedule = [(3.4445, -4.7750, 2.0315)] * jordan_steps + [(2.0, -1.5, 0.5)] * stable_steps
    for a, b, c in schedule:
        xxt = x @ x.T
        x = a * x + b * (xxt @ x) + c * (xxt @ (xxt @ x))
    return x.T if flip else x


def ref_muon(w0, grads, lrs, nesterov=True, jordan_steps=8, stable_steps=2, gamma=GAMMA):
    """Yields W_t for each step of Algorithm 1, in float64."""
    w = np.asarray(w0, np.float64)
    m = np.zeros_like(w)
    n_rows, n_cols = w.shape
    out = []
    for g, lr in zip(grads, lrs):
        g = np.asarray(g, np.float64)
        m = MU * m + g
        look = MU * m + g if nesterov else m
        o = ref_newton_schulz(look, jordan_steps, stable_steps) * np.sqrt(max(n_rows, n_cols)) * gamma
        w = w * (1.0 - lr * LAMBDA) - lr * o
        out.append(w)
    return out


def run_opt(tx, params, grads_seq):
    """Apply tx for each gradient tree (jitted update); returns the list of parameter trees."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g in grads_seq:
        upd, state = step(g, state, params)
        params = optax.apply_updates(params, upd)
        out.append(params)
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def rand(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(0.0, scale, size=shape), jnp.float32)


# --------------------------------------------------------------------------------------------------
# Algorithm 1 for single matrices


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["n<m", "n>m"])
def test_single_matrix_matches_numpy_algorithm1(shape):
    rng = np.random.default_rng(0)
    w0 = rand(rng, shape, 0.05)
    grads = [rand(rng, shape, 1e-2) for _ in range(4)]
    sched = lambda count: LR * (count + 1.0) / 4.0  # a schedule, so the step count must be right
    lrs = [LR * (t + 1.0) / 4.0 for t in range(4)]
    got = run_opt(optim.muon(sched), {"w": w0}, [{"w": g} for g in grads])
    want = ref_muon(w0, grads, lrs)
    prev_got, prev_want = np.asarray(w0, np.float64), np.asarray(w0, np.float64)
    for t in range(4):
        g_t, w_t = np.asarray(got[t]["w"], np.float64), want[t]
        assert rel(g_t - prev_got, w_t - prev_want) < RTOL_F32, t
        prev_got, prev_want = g_t, w_t


def test_reference_variants_are_outside_tolerance():
    """The tolerance above separates Algorithm 1 from near variants (so the test can fail)."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(0, 0.05, (12, 20))
    grads = [rng.normal(0, 1e-2, (12, 20)) for _ in range(3)]
    lrs = [LR] * 3
    base = ref_muon(w0, grads, lrs)[-1] - w0
    for kw in [dict(nesterov=False), dict(jordan_steps=5, stable_steps=0), dict(jordan_steps=10, stable_steps=0),
               dict(gamma=0.2)]:
        other = ref_muon(w0, grads, lrs, **kw)[-1] - w0
        assert rel(other, base) > 100 * RTOL_F32, kw


def test_ns_output_is_nearly_orthogonal_with_rms_gamma():
    rng = np.random.default_rng(2)
    g = rand(rng, (16, 40))
    o = np.asarray(optim.orthogonalize(g, rms_scale=GAMMA), np.float64)
    np.testing.assert_allclose(np.sqrt((o ** 2).mean()), GAMMA, rtol=2e-2)
    s = np.linalg.svd(o / (GAMMA * np.sqrt(40)), compute_uv=False)
    assert np.all(np.abs(s - 1.0) < 2e-2), s


def test_zero_gradient_gives_pure_weight_decay():
    w0 = jnp.ones((4, 6), jnp.float32)
    (w1,) = run_opt(optim.muon(LR), {"w": w0}, [{"w": jnp.zeros((4, 6))}])
    np.testing.assert_allclose(w1["w"], np.full((4, 6), 1.0 - LR * LAMBDA), rtol=1e-6)


def test_bf16_newton_schulz_close_to_fp32():
    rng = np.random.default_rng(3)
    w0 = rand(rng, (24, 40), 0.05)
    grads = [{"w": rand(rng, (24, 40), 1e-2)} for _ in range(2)]
    f32 = run_opt(optim.muon(LR), {"w": w0}, grads)[-1]["w"]
    bf16 = run_opt(optim.muon(LR, ns_dtype=jnp.bfloat16), {"w": w0}, grads)[-1]["w"]
    assert bf16.dtype == jnp.float32
    err = rel(np.asarray(bf16) - np.asarray(w0), np.asarray(f32) - np.asarray(w0))
    assert 0 < err < RTOL_BF16, err  # > 0: the bf16 path really differs


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for v in eqn.params.values():
            if hasattr(v, "jaxpr"):
                yield from _dots(v.jaxpr)


@pytest.mark.parametrize("ns_dtype", [jnp.float32, jnp.bfloat16])
def test_newton_schulz_matmul_precision(ns_dtype):
    """fp32 NS must not fall back to TF32/bf16 passes on accelerators (conftest already forces
    'highest' on CPU, so check the requested precision in the program itself)."""
    jaxpr = jax.make_jaxpr(lambda x: optim.hybrid_newton_schulz(x, ns_dtype=ns_dtype))(jnp.ones((2, 3, 5)))
    dots = list(_dots(jaxpr.jaxpr))
    assert len(dots) == 3  # one NS step in a scan: X X^T, A A, (aI + bA + cAA) X
    want = jax.lax.Precision.HIGHEST if ns_dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    for eqn in dots:
        assert all(p == want for p in eqn.params["precision"])
        assert all(v.aval.dtype == jnp.dtype(ns_dtype) for v in eqn.invars)
        assert eqn.params["preferred_element_type"] == jnp.dtype(ns_dtype)


# --------------------------------------------------------------------------------------------------
# Batching and row blocks


def test_batched_experts_equal_per_matrix_loop():
    rng = np.random.default_rng(4)
    e, n, m = 5, 6, 10
    w0 = rand(rng, (e, n, m), 0.05)
    w0 = w0.at[2].multiply(30.0)  # very different norms per expert: each must be normalised alone
    grads = [rand(rng, (e, n, m), 1e-2) for _ in range(2)]
    grads[0] = grads[0].at[1].set(0.0)  # an expert with no tokens
    batched = run_opt(optim.muon(LR), {"w": w0}, [{"w": g} for g in grads])[-1]["w"]
    for i in range(e):
        single = run_opt(optim.muon(LR), {"w": w0[i]}, [{"w": g[i]} for g in grads])[-1]["w"]
        np.testing.assert_allclose(batched[i], single, rtol=1e-6, atol=1e-7)
    # and the shape scale is per expert: sqrt(max(n, m)), not anything involving E
    want = ref_muon(w0[3], [g[3] for g in grads], [LR, LR])[-1]
    assert rel(np.asarray(batched[3]) - np.asarray(w0[3]), want - np.asarray(w0[3])) < RTOL_F32


@pytest.mark.parametrize("blocks", [(8, 8), (3, 3, 9), (4, 4, 4, 4)], ids=["csa_wkv", "mhc_fn", "wo_a"])
def test_row_blocks_equal_separate_matrices(blocks):
    rng = np.random.default_rng(5)
    rows, cols = sum(blocks), 20
    w0 = rand(rng, (rows, cols), 0.05)
    grads = [rand(rng, (rows, cols), 1e-2) for _ in range(2)]
    grads = [g.at[: blocks[0]].multiply(50.0) for g in grads]  # unequal block norms
    key = "['w']"
    fused = run_opt(optim.muon(LR, row_blocks={key: blocks}), {"w": w0}, [{"w": g} for g in grads])[-1]["w"]
    whole = run_opt(optim.muon(LR), {"w": w0}, [{"w": g} for g in grads])[-1]["w"]
    start = 0
    for b in blocks:
        sl = slice(start, start + b)
        single = run_opt(optim.muon(LR), {"w": w0[sl]}, [{"w": g[sl]} for g in grads])[-1]["w"]
        np.testing.assert_allclose(fused[sl], single, rtol=1e-6, atol=1e-7)
        start += b
    assert rel(np.asarray(fused) - np.asarray(w0), np.asarray(whole) - np.asarray(w0)) > 1e-2


def test_row_blocks_of_tiny_model():
    cfg = CONFIGS["a"]
    blocks = optim.muon_row_blocks(init_params(cfg), cfg)
    n, c, ci = cfg.hc_mult, cfg.head_dim, cfg.index_head_dim
    g, dg = cfg.o_groups, cfg.o_lora_rank
    assert blocks["['layers'][1]['attn']['compressor']['wkv']"] == (c, c)  # CSA: overlapping
    assert blocks["['layers'][1]['attn']['compressor']['wgate']"] == (c, c)
    assert blocks["['layers'][1]['attn']['indexer']['compressor']['wkv']"] == (ci, ci)
    assert "['layers'][2]['attn']['compressor']['wkv']" not in blocks  # HCA: one matrix
    assert blocks["['layers'][0]['attn']['wo_a']"] == (dg,) * g
    assert blocks["['layers'][0]['hc_attn']['fn']"] == (n, n, n * n)
    assert blocks["['mtp']['hc_ffn']['fn']"] == (n, n, n * n)
    assert "['hc_head']['fn']" not in blocks
    assert not any("['fn']" in k for k in optim.muon_row_blocks(init_params(cfg), cfg, split_mhc_fn=False))
    labels = optim.param_labels(init_params(cfg), cfg)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert all(flat[k] == optim.MUON for k in blocks)


# --------------------------------------------------------------------------------------------------
# Labels and the combined optimiser


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_every_leaf_labelled_exactly_once(name):
    cfg = CONFIGS[name]
    params = init_params(cfg)
    labels = optim.param_labels(params, cfg)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert jax.tree.structure(optim.param_labels(param_specs(cfg), cfg)) == jax.tree.structure(params)
    assert jax.tree.leaves(optim.param_labels(param_specs(cfg), cfg)) == jax.tree.leaves(labels)
    leaves = jax.tree.leaves(labels)
    assert set(leaves) <= set(optim.LABELS)
    # the partition masks cover every leaf exactly once
    hits = sum(np.array([lab == group for lab in leaves], int) for group in optim.LABELS)
    assert np.all(hits == 1)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert flat["['embed']"] == flat["['head']"] == optim.ADAMW
    assert flat["['norm']"] == flat["['hc_head']['base']"] == flat["['hc_head']['scale']"] == optim.ADAMW_NO_DECAY
    assert flat["['hc_head']['fn']"] == optim.MUON
    for i in range(cfg.num_hidden_layers):
        lay = f"['layers'][{i}]"
        gate = f"{lay}['ffn']['gate']"
        assert flat[gate + "['weight']"] == optim.MUON
        if i < cfg.num_hash_layers:
            assert flat[gate + "['tid2eid']"] == optim.FROZEN
        else:
            assert flat[gate + "['bias']"] == optim.FROZEN
        for w in ("w1", "w2", "w3"):
            assert flat[f"{lay}['ffn']['experts']['{w}']"] == optim.MUON
            assert flat[f"{lay}['ffn']['shared_experts']['{w}']"] == optim.MUON
        for k in ("attn_norm", "ffn_norm"):
            assert flat[f"{lay}['{k}']"] == optim.ADAMW_NO_DECAY
        for k in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"):
            assert flat[f"{lay}['attn']['{k}']"] == optim.MUON
        for k in ("q_norm", "kv_norm", "attn_sink"):
            assert flat[f"{lay}['attn']['{k}']"] == optim.ADAMW_NO_DECAY
        for hc in ("hc_attn", "hc_ffn"):
            assert flat[f"{lay}['{hc}']['fn']"] == optim.MUON
            assert flat[f"{lay}['{hc}']['base']"] == flat[f"{lay}['{hc}']['scale']"] == optim.ADAMW_NO_DECAY
    for k, v in flat.items():
        if k.endswith("['ape']"):
            assert v == optim.ADAMW_NO_DECAY
    if cfg.num_nextn_predict_layers:
        for k in ("e_proj", "h_proj"):
            assert flat[f"['mtp']['{k}']"] == optim.MUON
        for k in ("enorm", "hnorm", "norm"):
            assert flat[f"['mtp']['{k}']"] == optim.ADAMW_NO_DECAY


def _tree_get(tree, path: str):
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.tree_util.keystr(p) == path:
            return v
    raise KeyError(path)


def _random_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rand(rng, x.shape, 1e-2).astype(x.dtype)
                        if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x), params)


def test_v4_optimizer_leaves_match_their_optimisers():
    cfg = CONFIGS["b"]
    params = init_params(cfg, seed=1)
    params["layers"][1]["ffn"]["gate"]["bias"] = jnp.linspace(-1.0, 1.0, cfg.n_routed_experts)
    grads = [_random_grads(params, s) for s in range(2)]
    sched = optax.linear_schedule(1e-3, 2e-3, 5)
    out = run_opt(optim.v4_optimizer(sched, cfg), params, grads)[-1]

    # frozen leaves are exactly unchanged
    tid = "['layers'][0]['ffn']['gate']['tid2eid']"
    bias = "['layers'][1]['ffn']['gate']['bias']"
    assert _tree_get(out, tid).dtype == jnp.int32
    np.testing.assert_array_equal(_tree_get(out, tid), _tree_get(params, tid))
    np.testing.assert_array_equal(_tree_get(out, bias), _tree_get(params, bias))

    def alone(tx, path):
        p = {"x": _tree_get(params, path)}
        return run_opt(tx, p, [{"x": _tree_get(g, path)} for g in grads])[-1]["x"]

    adamw = lambda wd: optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-20, weight_decay=wd)
    # embedding and head: AdamW with decay 0.1; decay matters since they are far from 0
    for path in ("['embed']", "['head']"):
        np.testing.assert_allclose(_tree_get(out, path), alone(adamw(0.1), path), rtol=1e-6, atol=1e-8)
        assert rel(alone(adamw(0.0), path) - _tree_get(params, path),
                   _tree_get(out, path) - _tree_get(params, path)) > 1e-3
    # norms (value 1, so decay would show) and mHC base/scale: AdamW without decay
    for path in ("['norm']", "['layers'][0]['attn_norm']", "['layers'][1]['hc_ffn']['scale']",
                 "['hc_head']['base']", "['layers'][0]['attn']['attn_sink']",
                 "['layers'][0]['attn']['compressor']['ape']"):
        np.testing.assert_allclose(_tree_get(out, path), alone(adamw(0.0), path), rtol=1e-6, atol=1e-8)
    # Muon leaves, including a batched expert stack and split fused tensors
    blocks = optim.muon_row_blocks(params, cfg)
    for path in ("['layers'][0]['ffn']['experts']['w2']", "['layers'][1]['ffn']['gate']['weight']",
                 "['layers'][1]['attn']['compressor']['wkv']", "['layers'][0]['attn']['wo_a']",
                 "['layers'][1]['hc_attn']['fn']"):
        tx = optim.muon(sched, row_blocks={"['x']": blocks[path]} if path in blocks else None)
        np.testing.assert_allclose(_tree_get(out, path), alone(tx, path), rtol=1e-6, atol=1e-7)
    # the CSA compressor wkv [2c, d] is its two halves done separately
    path, c = "['layers'][1]['attn']['compressor']['wkv']", cfg.head_dim
    w = _tree_get(params, path)
    for sl in (slice(0, c), slice(c, 2 * c)):
        half = run_opt(optim.muon(sched), {"x": w[sl]}, [{"x": _tree_get(g, path)[sl]} for g in grads])[-1]["x"]
        np.testing.assert_allclose(_tree_get(out, path)[sl], half, rtol=1e-6, atol=1e-7)


def test_v4_optimizer_accepts_float0_gradients_of_int_leaves():
    """jax.grad(..., allow_int=True) gives float0 for tid2eid; the update must still apply."""
    cfg = CONFIGS["a"]
    params = init_params(cfg, seed=8)
    tokens = jnp.array([[1, 2, 3]])

    def loss(p):
        gate = p["layers"][0]["ffn"]["gate"]
        ids = gate["tid2eid"][tokens]
        h = p["embed"][tokens] * p["norm"]
        return jnp.sum((h @ gate["weight"].T) ** 2) + jnp.sum(ids * 0)

    grads = jax.grad(loss, allow_int=True)(params)
    assert grads["layers"][0]["ffn"]["gate"]["tid2eid"].dtype == jax.dtypes.float0
    tx = optim.v4_optimizer(1e-3, cfg)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    tid = new["layers"][0]["ffn"]["gate"]["tid2eid"]
    assert tid.dtype == jnp.int32
    np.testing.assert_array_equal(tid, params["layers"][0]["ffn"]["gate"]["tid2eid"])
    assert not np.allclose(new["layers"][0]["ffn"]["gate"]["weight"], params["layers"][0]["ffn"]["gate"]["weight"])


def test_sharded_update_equals_unsharded():
    devices = np.array(jax.devices()[:4])
    if devices.size < 4:
        pytest.skip("needs 4 devices")
    mesh = Mesh(devices, ("x",))
    rng = np.random.default_rng(6)
    params = {"experts": rand(rng, (4, 8, 12), 0.05), "wkv": rand(rng, (16, 8), 0.05), "norm": jnp.ones((8,))}
    grads = _random_grads(params, 7)
    shard = {"experts": NamedSharding(mesh, P("x")), "wkv": NamedSharding(mesh, P("x", None)),
             "norm": NamedSharding(mesh, P())}

    def labels(tree):
        return {"experts": "muon", "wkv": "muon", "norm": "adam"}

    tx = optax.partition({"muon": optim.muon(LR, row_blocks={"['wkv']": (8, 8)}), "adam": optax.adamw(LR)}, labels)
    want = run_opt(tx, params, [grads])[-1]
    sp = jax.device_put(params, shard)
    sg = jax.device_put(grads, shard)
    got = run_opt(tx, sp, [sg])[-1]
    assert got["experts"].sharding.is_equivalent_to(shard["experts"], 3)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
