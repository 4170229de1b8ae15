"""Every parameter's derived properties agree with its one declaration (``v4jax.params``).

For the presets (tiny, small, V4-Flash, V4-Pro, on abstract shapes) and the tiny test configs, in
both parameter layouts: shape and dtype, optimizer label, Muon row blocks, sharding on a mesh and
the format ``to-safetensors`` writes come from the declaration; the initial values follow its
initialiser; and the declarations say what the release and the spec say of each kind of tensor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS, flat, rel
from v4jax import optim
from v4jax.config import model_config_from_yaml
from v4jax.convert.names import official_name
from v4jax.convert.orbax_to_safetensors import _Exporter
from v4jax.model import init_params, param_specs
from v4jax.parallel import DEFAULT_RULES, ParallelConfig, make_mesh
from v4jax.params import path_keys
from v4jax.schema import infos, param_shardings, tree_infos

PRESETS = {name: model_config_from_yaml(f"configs/{name}.yaml") for name in ("tiny", "small", "v4-flash", "v4-pro")}
ALL = {**PRESETS, **{f"test-{k}": v for k, v in CONFIGS.items()}}


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "stages"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_derived_properties_follow_the_declaration(name, scan):
    config = ALL[name]
    declared = flat(infos(config, scan))
    for dtype in (jnp.float32, jnp.bfloat16):
        specs = flat(param_specs(config, dtype, scan))
        assert specs.keys() == declared.keys()
        for k, s in specs.items():
            assert s.shape == declared[k].shape and s.dtype == declared[k].dtype(dtype), k
    specs = param_specs(config, jnp.bfloat16, scan)
    labels = flat(optim.param_labels(specs, config))
    blocks = optim.muon_row_blocks(specs, config)
    for k, info in declared.items():
        assert labels[k] == info.optimizer, k
        assert blocks.get(k) == info.row_blocks, k
    mesh = make_mesh(ParallelConfig(1, 2, 2, 2))  # context 1: the rules' axes of size 1 are left out
    shardings = flat(param_shardings(specs, mesh, config))
    for k, info in declared.items():
        for dim, logical, axes in zip(info.shape, info.axes, tuple(shardings[k].spec) + (None,) * len(info.shape)):
            want = tuple(a for a in DEFAULT_RULES.get(logical, ()) if mesh.shape[a] > 1) if logical else ()
            want = want if want and dim % (2 ** len(want)) == 0 else ()
            got = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            assert got == tuple(want), (k, info.axes, shardings[k].spec)


@pytest.mark.parametrize("quantize", ["none", "fp8", "fp8+fp4"])
def test_export_format_follows_the_declaration(quantize):
    """What to-safetensors writes for each tensor (fp32 asked for plain tensors): FP8 for "fp8"
    tensors when quantising, FP8 or packed FP4 (int8) for routed experts, fp32 for fp32-kept ones."""
    config = CONFIGS["a"]
    exporter = _Exporter(None, config, "official", quantize, np.dtype(np.float32), 1 << 20, True)
    specs = param_specs(config, jnp.bfloat16)
    written = {t.name: t.dtype.name for t in exporter.tensors(specs)}
    quantised = {"none": "float32", "fp8": "float8_e4m3fn", "fp8+fp4": "int8"}[quantize]
    for path, info in jax.tree_util.tree_flatten_with_path(tree_infos(config, specs))[0]:
        keys = path_keys(path)
        want = {"int": "int64", "f32": "float32", "plain": "float32", "experts": quantised,
                "fp8": "float32" if quantize == "none" else "float8_e4m3fn"}[info.export]
        name = official_name(keys, 0) if info.export == "experts" else official_name(keys)
        assert written[name] == want, name


@pytest.mark.parametrize("name", ["a", "b"])
def test_initial_values_follow_the_initialiser(name):
    config = CONFIGS[name]
    params = flat(init_params(config, seed=3))
    for k, info in flat(infos(config)).items():
        v = np.asarray(params[k], np.float64)
        if info.init == "ones":
            assert (v == 1).all(), k
        elif info.init == "zeros":
            assert (v == 0).all(), k
        elif info.init == "hc_scale":
            np.testing.assert_allclose(v, 0.01, rtol=1e-6, err_msg=k)
        elif info.init == "hash":
            assert v.dtype.kind in "iuf" and ((v >= 0) & (v < config.n_routed_experts)).all(), k
            assert all(len(set(row)) == len(row) for row in v.astype(int)), k  # K distinct experts
        else:
            assert abs(v.mean()) < 0.2 * config.initializer_range, k
            assert abs(v.std() / config.initializer_range - 1) < 0.2 if v.size >= 256 else v.std() > 0, k


def test_declarations_say_what_the_spec_says():
    """A few facts of the release (spec §3, §4) read off the declarations of V4-Flash."""
    config = PRESETS["v4-flash"]
    d = flat(infos(config))
    lay = "['layers'][3]"  # an HCA layer (learned router)
    assert d[f"{lay}['ffn']['experts']['w1']"].export == "experts"  # FP4 in the release
    assert d[f"{lay}['attn']['wq_a']"].export == "fp8" and d[f"{lay}['attn']['compressor']['wkv']"].export == "plain"
    assert d[f"{lay}['hc_attn']['fn']"].kind == "f32" and d[f"{lay}['attn']['attn_sink']"].kind == "f32"
    assert d[f"{lay}['ffn']['gate']['bias']"].optimizer == optim.FROZEN  # moved by the aux-loss-free rule
    assert d["['layers'][0]['ffn']['gate']['tid2eid']"].kind == "int"
    assert d["['embed']"].optimizer == d["['head']"].optimizer == optim.ADAMW
    assert d[f"{lay}['attn']['wo_a']"].row_blocks == (config.o_lora_rank,) * config.o_groups
    assert d["['layers'][2]['attn']['compressor']['wkv']"].row_blocks == (config.head_dim,) * 2  # CSA
    n = config.hc_mult
    assert d[f"{lay}['hc_ffn']['fn']"].row_blocks == (n, n, n * n) and d["['hc_head']['fn']"].row_blocks is None


def test_modules_run_functionally():
    """NNX tree mode (the module through jax.jit as a pytree) and split/merge both give ``forward``
    on the module's pure tree, whose names are the state's; a submodule's call is its pure function."""
    from flax import nnx  # noqa: PLC0415

    from v4jax.attention import attention  # noqa: PLC0415
    from v4jax.model import Transformer, forward  # noqa: PLC0415
    from v4jax.params import pure  # noqa: PLC0415

    config = CONFIGS["a"]
    model = Transformer(config, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16)))
    want = forward(pure(model), tokens, config)["logits"]
    tree_mode = jax.jit(lambda m, t: m(t)["logits"])(model, tokens)
    graphdef, state = nnx.split(model)
    merged = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)["logits"])(state, tokens)
    assert rel(tree_mode, want) <= 1e-6 and rel(merged, want) <= 1e-6
    names = jax.tree.structure(jax.tree.map(lambda _: 0, nnx.to_pure_dict(state)))
    listed = jax.tree.structure(jax.tree.map(lambda _: 0, pure(model)))
    assert names.num_leaves == listed.num_leaves
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, config.hidden_size))
    pos, seg = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.zeros((2, 16), jnp.int32)
    got, _ = model.layers[1].attn(x, pos, seg)
    ref, _ = attention(x, pure(model)["layers"][1]["attn"], config, 1, pos, seg)
    np.testing.assert_array_equal(got, ref)
