"""Scanned layers (v4jax.scan): the scan layout runs the same model as the per-layer loop.

Reference: the per-layer Python loop over the list layout (itself checked against transformers in
test_parity_model). Tolerance: both run the same fp32 operations, only inside or outside a loop, so
results agree to rounding: max relative error 1e-6 on logits, 1e-5 on the loss, gradient norm and
updated parameters; 1e-4 for a sharded step against one device (as in test_parallel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS, batch, rel
from v4jax.config import model_config_from_yaml
from v4jax.model import forward, init_params, param_specs
from v4jax.parallel import ParallelConfig, batch_sharding, make_mesh
from v4jax.scan import Stage, layer_signature, plan, stack_layers, unstack_layers
from v4jax.schema import param_shardings, shard_like_params
from v4jax.trainer import TrainConfig, init_state, make_optimizer, make_train_step

# 7 layers: two hash-routed SWA layers, then (CSA, HCA) x 2 and a last CSA
CONFIG = CONFIGS["a"].replace(num_hidden_layers=7, layer_types=("swa", "swa", "csa", "hca", "csa", "hca", "csa"))
B, S = 4, 40


def test_plan_of_the_released_flash():
    # compress_ratios [0, 0, 4, 128, 4, ..., 4] with 3 hash layers (spec §1): two hash SWA layers,
    # the hash CSA layer 2 alone, then (HCA, CSA) x 20
    flash = model_config_from_yaml("configs/v4-flash.yaml")
    assert plan(flash) == (Stage(0, 1, 2), Stage(2, 1, 1), Stage(3, 2, 20))
    assert plan(CONFIG) == (Stage(0, 1, 2), Stage(2, 2, 2), Stage(6, 1, 1))


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "small", "tiny"])
def test_plan_covers_every_layer_once_with_equal_signatures(name):
    config = model_config_from_yaml(f"configs/{name}.yaml")
    seen = []
    for st in plan(config):
        for j in range(st.period):
            ids = list(st.layer_ids(j))
            assert len(ids) == st.repeats
            assert {layer_signature(config, i) for i in ids} == {layer_signature(config, ids[0])}
            seen += ids
    assert sorted(seen) == list(range(config.num_hidden_layers))


def test_layouts_round_trip():
    params = init_params(CONFIG, 0)
    stacked = init_params(CONFIG, 0, scan=True)
    assert "layers" not in stacked and len(stacked["stages"]) == 3
    assert stacked["stages"][1][0]["ffn"]["experts"]["w1"].shape == (2,) + params["layers"][2]["ffn"]["experts"]["w1"].shape
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked, CONFIG), params)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(params, CONFIG), stacked)
    specs = param_specs(CONFIG, scan=True)
    assert jax.tree.structure(specs) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda s: s.shape, specs) == jax.tree.map(lambda a: a.shape, stacked)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_forward_matches_the_loop(remat):
    par = ParallelConfig(remat=remat, unroll_stages=0)  # every stage a loop
    params = init_params(CONFIG, 0)
    tokens = batch(CONFIG, B, S)["tokens"]
    run = jax.jit(lambda p: forward(p, tokens, CONFIG, mtp=True, with_aux=True, parallel=par))
    loop, scanned = run(params), run(stack_layers(params, CONFIG))
    assert rel(scanned["logits"], loop["logits"]) <= 1e-6
    assert rel(scanned["mtp_logits"], loop["mtp_logits"]) <= 1e-6
    assert len(scanned["routing"]) == CONFIG.num_hidden_layers
    for a, b in zip(scanned["routing"], loop["routing"]):
        np.testing.assert_array_equal(a["idx"], b["idx"])
        assert rel(a["scores"], b["scores"]) <= 1e-6
        assert a["attn"].keys() == b["attn"].keys()
        if "entry_probs" in b["attn"]:
            assert rel(a["attn"]["entry_probs"], b["attn"]["entry_probs"]) <= 1e-6


def _step(params, config, par=None, mesh=None, b=None):
    cfg = TrainConfig(steps=10, bias_update_speed=0.01)
    opt = make_optimizer(cfg, config)
    state = init_state(params, opt)
    if mesh is not None:
        state = jax.device_put(state, shard_like_params(state, params, mesh, config))
    return make_train_step(config, cfg, opt, par, mesh)(state, b if b is not None else batch(config, B, S))


# 6 layers in two stages (2 x SWA, 2 x (CSA, HCA)), 8 experts to split over the expert axis
STEP_CONFIG = CONFIG.replace(num_hidden_layers=6, layer_types=CONFIG.layer_types[:6], n_routed_experts=8)


@pytest.fixture(scope="module")
def scan_step():
    return _step(init_params(STEP_CONFIG, 0, scan=True), STEP_CONFIG)


def test_scan_train_step_matches_the_loop(scan_step):
    config = STEP_CONFIG
    loop_state, loop = _step(init_params(config, 0), config)
    scan_state, scanned = scan_step
    for k in ("loss", "grad_norm", "balance_loss", "indexer_loss", "max_load_over_mean"):
        assert abs(float(scanned[k]) - float(loop[k])) <= 1e-5 * abs(float(loop[k])), k
    got = unstack_layers(scan_state["params"], config)
    # every parameter moved the same way, router biases (the aux-loss-free update) included
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, loop_state["params"])
    bias = [got["layers"][i]["ffn"]["gate"]["bias"] for i in range(config.num_hash_layers, 6)]
    assert all(np.abs(np.asarray(b)).max() > 0 for b in bias)


def test_unrolled_stages_match_the_loop(scan_step):
    """parallel.unroll_stages: both stages (2 repeats each) run unrolled on the scan layout; the same
    step as the scanned one, and the program has two loops fewer."""
    config = STEP_CONFIG
    params = init_params(config, 0, scan=True)
    par = ParallelConfig(unroll_stages=2)
    _, unrolled = _step(params, config, par)
    for k in ("loss", "grad_norm", "balance_loss", "indexer_loss"):
        assert abs(float(unrolled[k]) - float(scan_step[1][k])) <= 1e-5 * abs(float(scan_step[1][k])), k
    tokens = batch(config, B, S)["tokens"]

    def loops(par):
        text = jax.jit(lambda p: forward(p, tokens, config, parallel=par)["logits"]).lower(params).as_text()
        return text.count("stablehlo.while")

    looped = loops(ParallelConfig(unroll_stages=0))
    assert loops(ParallelConfig(unroll_stages=1)) == looped
    assert loops(par) == looped - 2
    with pytest.raises(ValueError, match="unroll_stages"):
        ParallelConfig(unroll_stages=-1)


def test_scan_train_step_on_a_mesh_matches_one_device(scan_step):
    config = STEP_CONFIG
    params = init_params(config, 0, scan=True)
    par = ParallelConfig(2, 1, 2, 2, capacity_factor=2.0)
    mesh = make_mesh(par)
    shardings = param_shardings(params, mesh, config)
    assert shardings["stages"][1][0]["ffn"]["experts"]["w1"].spec == jax.sharding.PartitionSpec(
        None, "expert", "tensor", None)
    b = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch(config, B, S).items()}
    _, metrics = _step(jax.device_put(params, shardings), config, par, mesh, b)
    assert int(metrics["dropped_tokens"]) == 0
    alone = scan_step[1]
    for k in ("loss", "grad_norm"):
        assert abs(float(metrics[k]) - float(alone[k])) <= 1e-4 * abs(float(alone[k])), k


def _program_lines(config, scan):
    """Lines of the lowered training-loss gradient program (StableHLO) on abstract shapes."""
    specs = param_specs(config, scan=scan)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(p, t):
        out = forward(p, t, config, mtp=True)
        return jnp.mean(out["logits"]) + jnp.mean(out["mtp_logits"])

    return len(jax.jit(jax.grad(loss, allow_int=True)).lower(specs, tokens).as_text().splitlines())


def test_program_size_does_not_grow_with_depth():
    def deep(pairs):
        return CONFIG.replace(num_hidden_layers=2 + 2 * pairs, layer_types=("swa", "swa") + ("csa", "hca") * pairs)

    shallow, deeper = deep(2), deep(8)
    loop_growth = _program_lines(deeper, scan=False) - _program_lines(shallow, scan=False)
    scan_growth = _program_lines(deeper, scan=True) - _program_lines(shallow, scan=True)
    # The unrolled program grows by a whole layer per layer; the scanned one only by the slices that
    # hand each layer's routing info out of the scan (under 3% of a layer when this was written).
    assert loop_growth > _program_lines(shallow, scan=False)
    assert 0 <= scan_growth < 0.05 * loop_growth
