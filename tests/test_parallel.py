"""Sharding on 8 fake CPU devices: every mesh gives the single-device numbers.

Tolerance: the sharded programs reorder sums (all-reduces, expert dispatch), so fp32 results agree
to rounding: max relative error 2e-5 on logits, 1e-4 on the loss and gradient norm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS, rel, sharpened, write_checkpoint
from tests.helpers import batch as make_batch
from v4jax.checkpoint import Checkpointer, abstract
from v4jax.model import forward, init_params
from v4jax.moe import route, routed_experts, routed_experts_all_to_all, shared_expert
from v4jax.parallel import (
    DEFAULT_RULES,
    ParallelConfig,
    ShardingError,
    batch_sharding,
    make_mesh,
    spec_for,
    validate_rules,
)
from v4jax.schema import check_rule_axes, param_shardings, shard_like_params
from v4jax.trainer import TrainConfig, init_state, make_optimizer, make_train_step

CONFIG = CONFIGS["a"].replace(n_routed_experts=8, num_hidden_layers=2, layer_types=("csa", "hca"), num_hash_layers=1)
MESHES = {"8x1x1x1": (8, 1, 1, 1), "2x2x2x1": (2, 2, 2, 1), "1x1x8x1": (1, 1, 8, 1), "2x1x2x2": (2, 1, 2, 2)}
B, S = 8, 24


def batch(config=CONFIG, b=B, s=S):
    return make_batch(config, b, s)


def parallel_for(shape):
    return ParallelConfig(*shape, capacity_factor=float(shape[2]))  # capacity n_ep: nothing can drop


@pytest.fixture(scope="module")
def params():
    return sharpened(init_params(CONFIG, seed=0))


@pytest.fixture(scope="module")
def single(params):
    b = batch()
    logits = jax.jit(lambda p, t: forward(p, t, CONFIG, mtp=True)["logits"])(params, b["tokens"])
    cfg = TrainConfig(steps=10)
    opt = make_optimizer(cfg, CONFIG)
    _, metrics = make_train_step(CONFIG, cfg, opt)(init_state(jax.tree.map(jnp.copy, params), opt), b)  # donated
    return np.asarray(logits), {k: float(metrics[k]) for k in ("loss", "grad_norm")}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_matches_single_device(name, params, single):
    shape = MESHES[name]
    par = parallel_for(shape)
    mesh = make_mesh(par)
    sharded = jax.device_put(jax.tree.map(jnp.copy, params), param_shardings(params, mesh, CONFIG))  # train donates
    b = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch().items()}
    fwd = jax.jit(lambda p, t: forward(p, t, CONFIG, mtp=True, parallel=par, mesh=mesh)["logits"])
    assert rel(fwd(sharded, b["tokens"]), single[0]) <= 2e-5

    cfg = TrainConfig(steps=10)
    opt = make_optimizer(cfg, CONFIG)
    state = init_state(sharded, opt)
    placed = shard_like_params(state, params, mesh, CONFIG)
    state = jax.device_put(state, placed)
    new_state, metrics = make_train_step(CONFIG, cfg, opt, par, mesh)(state, b)
    assert int(metrics["dropped_tokens"]) == 0
    # the state leaves the step as it came in: sharded by the rules, not replicated
    same = jax.tree.map(lambda a, sh: a.sharding.is_equivalent_to(sh, a.ndim), new_state, placed)
    assert all(jax.tree.leaves(same))
    for k in ("loss", "grad_norm"):
        assert abs(float(metrics[k]) - single[1][k]) / abs(single[1][k]) <= 1e-4, k


def test_params_are_really_sharded(params):
    mesh = make_mesh(ParallelConfig(2, 2, 2, 1))
    sh = param_shardings(params, mesh, CONFIG)
    assert sh["layers"][1]["ffn"]["experts"]["w1"].spec == jax.sharding.PartitionSpec("expert", None, "fsdp")
    assert sh["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sh["layers"][0]["ffn"]["gate"]["tid2eid"].spec == jax.sharding.PartitionSpec(None, None)


def test_rules_refuse_two_axes_on_one_mesh_axis(params):
    with pytest.raises(ShardingError, match="'mlp' and 'embed' both on mesh axis 'fsdp'"):
        check_rule_axes({**DEFAULT_RULES, "mlp": ("fsdp",)}, params, CONFIG)
    with pytest.raises(ShardingError, match="at most once"):
        validate_rules({**DEFAULT_RULES, "embed": ("fsdp", "fsdp")})
    mesh = make_mesh(ParallelConfig(1, 2, 2, 2))
    with pytest.raises(ShardingError, match="two dimensions"):
        spec_for(("embed", "embed"), (8, 8), mesh)
    with pytest.raises(ShardingError, match="needs 16 devices"):
        make_mesh(ParallelConfig(2, 2, 2, 2))


def test_capacity_dispatch_drops_and_counts():
    mesh = make_mesh(ParallelConfig(1, 1, 8, 1))
    config = CONFIG
    p = init_params(config, 0)["layers"][1]["ffn"]
    x = jax.random.normal(jax.random.PRNGKey(0), (64, config.hidden_size))
    idx, w, _ = route(x, p["gate"], jnp.zeros(64, jnp.int32), config)
    ref, _ = routed_experts(x, idx, w, p["experts"], config.swiglu_limit)
    full, dropped = routed_experts_all_to_all(x, idx, w, p["experts"], config.swiglu_limit, mesh, capacity_factor=8.0)
    assert int(dropped) == 0 and rel(full, ref) <= 1e-5
    small, dropped = routed_experts_all_to_all(x, idx, w, p["experts"], config.swiglu_limit, mesh,
                                               capacity_factor=0.25)
    assert int(dropped) > 0
    # a token whose choices all arrived is exact; the others lack exactly the dropped experts
    assert rel(small, ref) > 1e-3


def _rank_within(keys):
    """For each position, how many earlier positions hold the same key (numpy, for the references)."""
    seen, rank = {}, np.zeros(len(keys), np.int64)
    for i, key in enumerate(keys):
        rank[i] = seen.get(key, 0)
        seen[key] = rank[i] + 1
    return rank


def test_capacity_dispatch_counts_each_dropped_pair_once():
    """The count equals a numpy replay of the dispatch rule (per token shard, the pairs past C =
    ceil(cf * t_local * k / n_ep) for one destination), also when a tensor axis replicates the tokens."""
    config = CONFIG
    p = init_params(config, 0)["layers"][1]["ffn"]
    x = jax.random.normal(jax.random.PRNGKey(2), (64, config.hidden_size))
    idx, w, _ = route(x, p["gate"], jnp.zeros(64, jnp.int32), config)
    n_ep, cf, k = 4, 0.5, idx.shape[1]
    e_local = config.n_routed_experts // n_ep
    shards = np.split(np.asarray(idx), n_ep)  # tokens split over the expert axis only
    cap = -(-int(cf * shards[0].shape[0] * k) // n_ep)
    expected = sum(int(np.sum(_rank_within(list(sh.reshape(-1) // e_local)) >= cap)) for sh in shards)
    assert expected > 0
    for shape in [(1, 1, 4, 1), (1, 1, 4, 2)]:
        mesh = make_mesh(ParallelConfig(*shape), jax.devices()[:int(np.prod(shape))])
        _, dropped = routed_experts_all_to_all(x, idx, w, p["experts"], config.swiglu_limit, mesh, capacity_factor=cf)
        assert int(dropped) == expected, shape


def test_padded_backend_counts_its_overflow():
    """The padded matmul keeps the first ceil(cf * t * k / e) pairs of each expert (in token order)
    and drops the rest: its output equals the exact MoE with the dropped pairs' weights set to 0,
    and ``dropped`` counts them."""
    from v4jax.moe import moe

    config = CONFIG
    p = init_params(config, 0)["layers"][1]["ffn"]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, config.hidden_size))
    cf = 0.5
    y, info = moe(x, p, jnp.zeros((2, 16), jnp.int32), config, ParallelConfig(moe_backend="padded",
                                                                                capacity_factor=cf))
    flat = x.reshape(32, -1)
    idx, w, _ = route(flat, p["gate"], jnp.zeros(32, jnp.int32), config)
    cap = -(-int(cf * idx.size) // config.n_routed_experts)
    over = (_rank_within(list(np.asarray(idx).reshape(-1))) >= cap).reshape(idx.shape)
    assert 0 < over.sum() == int(info["dropped"])
    kept, _ = routed_experts(flat, idx, jnp.where(over, 0.0, w), p["experts"], config.swiglu_limit)
    ref = kept + shared_expert(flat, p["shared_experts"], config.swiglu_limit)
    assert rel(y.reshape(32, -1), ref) <= 1e-5


@pytest.mark.parametrize("backend", ["ragged_dot", "padded"])
def test_grouped_matmul_backends(backend):
    config = CONFIG
    p = init_params(config, 0)["layers"][1]["ffn"]
    x = jax.random.normal(jax.random.PRNGKey(1), (40, config.hidden_size))
    idx, w, _ = route(x, p["gate"], jnp.zeros(40, jnp.int32), config)
    ref, _ = routed_experts(x, idx, w, p["experts"], config.swiglu_limit)
    got, _ = routed_experts(x, idx, w, p["experts"], config.swiglu_limit, backend, capacity_factor=8.0)
    assert rel(got, ref) <= 1e-5
    mesh = make_mesh(ParallelConfig(2, 1, 4, 1))
    got, _ = routed_experts_all_to_all(x, idx, w, p["experts"], config.swiglu_limit, mesh, backend, 8.0)
    assert rel(got, ref) <= 1e-5


def _kernel_leaving_unvisited_rows_nan():
    """A grouped matmul that behaves like a tiled GPU kernel: output rows past sum(sizes) are never
    written (NaN here), and the weight gradient masks rows by multiplying with a 0/1 group mask,
    so a NaN input row poisons it (0 * NaN)."""

    def unwritten(m, n, sizes):
        return jnp.where((jnp.arange(m) < jnp.sum(sizes))[:, None], 0.0, jnp.nan) * jnp.ones((m, n))

    @jax.custom_vjp
    def mm(x, w, sizes):
        return jax.lax.ragged_dot(x, w, sizes) + unwritten(x.shape[0], w.shape[2], sizes)

    def fwd(x, w, sizes):
        return mm(x, w, sizes), (x, w, sizes)

    def bwd(res, dy):
        x, w, sizes = res
        group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right")
        member = jax.nn.one_hot(group, w.shape[0], dtype=x.dtype)  # [m, g]; rows past the end: all 0
        dw = jnp.einsum("mg,mk,mn->gkn", member, x, dy)
        dx = jnp.einsum("mg,mn,gkn->mk", member, dy, w) + unwritten(x.shape[0], x.shape[1], sizes)
        return dx, dw, None

    mm.defvjp(fwd, bwd)
    return mm


def test_unvisited_rows_cannot_poison_gradients():
    from v4jax.moe import zero_unvisited_rows

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
    w1 = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
    sizes = jnp.array([3, 0, 4], jnp.int32)  # rows 7.. are empty slots, as in the capacity dispatch
    valid = (jnp.arange(12) < 7)[:, None]
    kernel = _kernel_leaving_unvisited_rows_nan()

    def loss(matmul, w1, w2):  # the expert FFN's shape: routing weight 0 on empty rows, output masked
        h = jnp.tanh(matmul(x, w1, sizes)) * jnp.where(valid, 1.0, 0.0)
        return jnp.sum(jnp.where(valid, matmul(h, w2, sizes), 0.0) ** 2)

    grad = jax.grad(loss, argnums=(1, 2))
    assert not np.isfinite(grad(kernel, w1, w2)[1]).all()  # the hazard is real without the mask
    reference = grad(jax.lax.ragged_dot, w1, w2)
    got = grad(lambda a, w, s: zero_unvisited_rows(kernel, a, w, s), w1, w2)
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_gradient", ["xla", "pallas"])
def test_kernel_grouped_matmul_vjp_matches_autodiff(weight_gradient):
    """The per-product custom VJP (XLA's ragged dot standing in for tokamax's kernels, the weight
    gradient by XLA or by our Pallas kernel in interpret mode) against autodiff of
    jax.lax.ragged_dot on the transposed weights: values and both gradients, with an empty group and
    rows past the groups' total. fp32, relative 1e-5."""
    from v4jax.moe import kernel_grouped_matmul

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(13, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 32, 16)), jnp.float32)  # [g, n, k]: stored [out, in]
    sizes = jnp.array([4, 0, 5, 2], jnp.int32)  # 11 of 13 rows
    dy = jnp.asarray(rng.normal(size=(13, 32)), jnp.float32) * (jnp.arange(13) < 11)[:, None]
    ref, ref_vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), sizes), x, w)
    kernels = ("xla", "xla", weight_gradient)
    got, got_vjp = jax.vjp(lambda a, b: kernel_grouped_matmul(a, b, sizes, kernels), x, w)
    assert rel(got, ref) <= 1e-5
    for g, r in zip(got_vjp(dy), ref_vjp(dy)):
        assert rel(g, r) <= 1e-5


def test_dispatch_and_combine_are_gathers_with_the_right_transposes():
    """dispatch (token copies to expert order) and combine (back, summed over a token's k copies)
    against the plain gather and scatter they replace, values and VJPs (fp32, relative 1e-6)."""
    from v4jax.moe import combine, dispatch

    rng = np.random.default_rng(2)
    t, k, d = 7, 3, 4
    flat = jnp.asarray(rng.integers(0, 5, t * k), jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32)
    out, vjp = jax.vjp(lambda a: dispatch(a, order, inverse, k), x)
    ref, ref_vjp = jax.vjp(lambda a: a[order // k], x)
    assert rel(out, ref) <= 1e-6 and rel(vjp(g)[0], ref_vjp(g)[0]) <= 1e-6
    scattered = lambda v: jnp.sum(jnp.zeros_like(v).at[order].set(v).reshape(t, k, d), axis=1)  # noqa: E731
    out, vjp = jax.vjp(lambda v: combine(v, order, inverse, k), ys)
    ref, ref_vjp = jax.vjp(scattered, ys)
    gy = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    assert rel(out, ref) <= 1e-6 and rel(vjp(gy)[0], ref_vjp(gy)[0]) <= 1e-6


def test_default_moe_backend_is_dropless():
    from v4jax.moe import resolve_backend

    assert ParallelConfig().moe_backend == "auto"
    assert resolve_backend("auto") == "ragged_dot"  # CPU: the reference; a GPU with tokamax: its kernels
    with pytest.raises(ShardingError, match="moe_backend"):
        ParallelConfig(moe_backend="dense")


def test_checkpoint_restores_across_meshes(params, tmp_path):
    cfg = TrainConfig(steps=10)
    opt = make_optimizer(cfg, CONFIG)
    mesh_a = make_mesh(ParallelConfig(2, 2, 2, 1))
    state = init_state(jax.tree.map(jnp.copy, params), opt)
    state = jax.device_put(state, shard_like_params(state, params, mesh_a, CONFIG))
    ckpt = Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(1, state, {"x": 1}, {"model": CONFIG.to_hf_dict()})
    ckpt.wait()

    mesh_b = make_mesh(ParallelConfig(1, 1, 4, 2))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                          shard_like_params(state, params, mesh_b, CONFIG))
    restored, data_state, _ = ckpt.restore(target)
    assert data_state == {"x": 1}
    w1 = restored["params"]["layers"][1]["ffn"]["experts"]["w1"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec("expert", "tensor", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)


def test_checkpoint_abstract_helper_keeps_shardings(params):
    mesh = make_mesh(ParallelConfig(8, 1, 1, 1))
    sharded = jax.device_put(params, param_shardings(params, mesh, CONFIG))
    a = abstract(sharded)
    assert a["embed"].sharding == sharded["embed"].sharding


def test_from_pretrained_shards_by_the_rules(tmp_path):
    import v4jax

    config = CONFIGS["a"]
    directory = write_checkpoint(tmp_path / "ck", config)
    mesh = make_mesh(ParallelConfig(2, 2, 2, 1))
    model = v4jax.from_pretrained(directory, dtype="float32", mesh=mesh)
    w1 = model.params["layers"][2]["ffn"]["experts"]["w1"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec("expert", None, "fsdp")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16))
    alone = v4jax.from_pretrained(directory, dtype="float32")
    assert rel(model.logits(tokens), alone.logits(tokens)) <= 2e-5


def test_any_batch_and_any_expert_count_on_a_mesh(params):
    """A batch x seq that the devices do not divide (1 x 37 on fsdp 2 x expert 2) and an expert count
    that the expert axis does not divide (8 on 3) run, and give the single-device logits: the MoE
    pads token rows and experts inside, and cuts the padding off again."""
    import v4jax

    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, 37))
    model = v4jax.Model(CONFIG, params)
    want, want_mtp = np.asarray(model.logits(tokens)), np.asarray(model.mtp_logits(tokens))
    for shape, names in (((2, 2), ("fsdp", "expert")), ((3,), ("expert",))):
        mesh = jax.make_mesh(shape, names, devices=jax.devices()[:int(np.prod(shape))])
        sharded = v4jax.Model(CONFIG, params, mesh=mesh)
        assert rel(sharded.logits(tokens), want) <= 2e-5, names
        assert rel(jax.jit(sharded.logits)(tokens), want) <= 2e-5, names
        assert rel(sharded.mtp_logits(tokens), want_mtp) <= 2e-5, names


def test_training_gradient_with_experts_the_expert_axis_does_not_divide(params):
    """8 experts on an expert axis of 3 (fsdp 2 x expert 3, 6 devices): the training loss and every
    parameter's gradient of the single device, and no token dropped."""
    from v4jax.trainer import loss_fn

    b = batch(b=6)
    cfg = TrainConfig(steps=10)

    def value_and_grad(p, b, parallel=None, mesh=None):
        fn = jax.value_and_grad(lambda p: loss_fn(p, b, CONFIG, cfg, 0, parallel, mesh), has_aux=True, allow_int=True)
        (loss, (metrics, _)), grads = jax.jit(fn)(p)
        return loss, metrics["dropped_tokens"], grads

    want_loss, _, want = value_and_grad(params, b)
    par = ParallelConfig(data=1, fsdp=2, expert=3, capacity_factor=3.0)
    mesh = make_mesh(par, devices=jax.devices()[:6])
    sharded = jax.device_put(params, param_shardings(params, mesh, CONFIG))
    loss, dropped, got = value_and_grad(sharded, {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()},
                                        par, mesh)
    assert int(dropped) == 0 and abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    # every leaf to 1e-5 of the largest gradient entry (a leaf of tiny gradients, such as mHC's head
    # base at ~1e-5, differs by the sharded sums' rounding relative to itself)
    floats = [(path, g, w) for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want))
              if jnp.issubdtype(w.dtype, jnp.floating)]
    scale = max(float(jnp.abs(w).max()) for _, _, w in floats)
    for path, g, w in floats:
        assert float(jnp.abs(g - w).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
