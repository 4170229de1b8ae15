"""V4's FP8/FP4 block quantisation (``v4jax.quant``) against a numpy reference written from the
spec (§2.11, §3.3): per block, a = max(amax, floor), scale = 2^ceil(log2(a / max code)), codes by
ml_dtypes' round-to-nearest-even casts. Quantised values compare exactly; products of quantised
operands in fp32 to 1e-6 relative."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.helpers import CONFIGS, rel
from tests.test_accumulation import packed_batch
from v4jax import quant, schema
from v4jax.config import ConfigError
from v4jax.layers import linear
from v4jax.model import init_params
from v4jax.moe import expert_ffn, swiglu
from v4jax.parallel import ParallelConfig, make_mesh
from v4jax.schema import param_shardings
from v4jax.trainer import TrainConfig, init_state, loss_fn, make_optimizer, make_train_step

REF = {"fp8": (448.0, 1e-4, ml_dtypes.float8_e4m3fn), "fp4": (6.0, 6.0 * 2.0**-126, ml_dtypes.float4_e2m1fn)}


def ref_quantize(x, block, fmt):
    """numpy, float64: x [..., R, C] in (rows, cols) blocks over its last two axes."""
    qmax, floor, code = REF[fmt]
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    br, bc = block
    for i in range(0, x.shape[-2], br):
        for j in range(0, x.shape[-1], bc):
            b = x[..., i:i + br, j:j + bc]
            a = np.maximum(np.max(np.abs(b), axis=(-2, -1), keepdims=True), np.float32(floor))
            s = 2.0 ** np.ceil(np.log2(a / qmax))
            out[..., i:i + br, j:j + bc] = np.clip(b / s, -qmax, qmax).astype(code).astype(np.float64) * s
    return out


def blocky(rng, shape, block):
    """Normal values with a different magnitude in every block (10^-6 to 10^3), one block all zero."""
    br, bc = block
    mag = 10.0 ** rng.uniform(-6, 3, size=shape[:-2] + (-(-shape[-2] // br), -(-shape[-1] // bc)))
    mag = np.repeat(np.repeat(mag, br, -2), bc, -1)[..., :shape[-2], :shape[-1]]
    x = rng.normal(size=shape) * mag
    x[..., :br, :bc] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("shape,block,fmt", [((3, 200, 300), (128, 128), "fp8"), ((37, 300), (1, 128), "fp8"),
                                             ((2, 5, 70), (1, 32), "fp4"), ((256, 256), (128, 128), "fp8")])
def test_quantize_matches_the_spec_reference(shape, block, fmt):
    x = blocky(np.random.default_rng(0), shape, block)
    got = np.asarray(quant.quantize(jnp.asarray(x), block, fmt))
    want = ref_quantize(x, block, fmt)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert np.any(got != x)  # it did quantise


def test_rows_stored_as_codes_and_scales_decode_to_the_quantised_values():
    x = blocky(np.random.default_rng(5), (3, 4, 448), (1, 64))
    codes, scales = quant.encode_rows(jnp.asarray(x), 64)
    assert codes.dtype == jnp.float8_e4m3fn and scales.dtype == jnp.float8_e8m0fnu and scales.shape == (3, 4, 7)
    want = ref_quantize(x.reshape(-1, 448), (1, 64), "fp8").reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(quant.decode_rows(codes, scales, 64)), want.astype(np.float32))
    codes, scales = quant.encode_rows(jnp.asarray(x[..., :100]), 64)  # a partial last block
    np.testing.assert_array_equal(np.asarray(quant.decode_rows(codes, scales, 64)),
                                  ref_quantize(x[..., :100].reshape(-1, 100), (1, 64), "fp8").reshape(3, 4, 100))


def test_ties_round_to_even_and_the_scale_is_the_smallest_power_of_two():
    # FP4, block max 6 (scale 1): 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 1.75 -> 2
    x = np.array([[6, .25, .75, 2.5, 3.5, 5, 1.75, -5] + [0] * 24], np.float32)
    np.testing.assert_array_equal(np.asarray(quant.quantize(jnp.asarray(x), (1, 32), "fp4"))[0, :8],
                                  [6, 0, 1, 2, 4, 4, 2, -4])
    # FP8: block max 448 keeps scale 1 (17 -> 16, 19 -> 20: steps of 2 in [16, 32)); 449 takes scale 2
    x = np.zeros((1, 128), np.float32)
    x[0, :3] = [448, 17, 19]
    np.testing.assert_array_equal(np.asarray(quant.quantize(jnp.asarray(x), (1, 128), "fp8"))[0, :3], [448, 16, 20])
    x[0, 0] = 449
    assert float(quant.quantize(jnp.asarray(x), (1, 128), "fp8")[0, 0]) == 448  # 449 / 2 = 224.5 -> 224
    s = quant.pow2_scale(jnp.asarray([448.0, 449.0, 896.0, 1e-30, 6.0, 6.01]), 448.0, 1e-4)
    np.testing.assert_array_equal(np.asarray(s)[:4], [1, 2, 2, 2.0**-22])  # 1e-4 / 448 -> 2^-22


def test_straight_through_gradient():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 256)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(2).normal(size=(4, 256)), jnp.float32)
    for f in (quant.activation, lambda a: quant.weight(a, "fp8"), lambda a: quant.weight(a, "fp4")):
        g = jax.grad(lambda a: jnp.sum(f(a) * c))(x)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


def test_linear_quantises_its_input_and_weight():
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(2, 9, 300)).astype(np.float32), rng.normal(size=(200, 300)).astype(np.float32)
    got = linear(jnp.asarray(x), quant.Quantized(jnp.asarray(w), "fp8"))
    want = ref_quantize(x.reshape(-1, 300), (1, 128), "fp8") @ ref_quantize(w, (128, 128), "fp8").T
    assert rel(got.reshape(-1, 200), want) <= 1e-6
    assert rel(linear(jnp.asarray(x), jnp.asarray(w)).reshape(-1, 200), want) > 1e-3  # quantisation shows


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_expert_matmuls_quantise_inputs_and_weights(fmt):
    rng = np.random.default_rng(4)
    e, f, d, m, limit = 3, 96, 160, 20, 7.0
    p = {k: rng.normal(size=s).astype(np.float32) for k, s in (("w1", (e, f, d)), ("w3", (e, f, d)),
                                                                 ("w2", (e, d, f)))}
    xs = rng.normal(size=(m, d)).astype(np.float32)
    sizes = np.array([7, 0, 13], np.int32)
    wts = rng.uniform(size=m).astype(np.float32)
    got, _ = expert_ffn(jnp.asarray(xs), jnp.asarray(sizes), jnp.asarray(wts),
                        {k: quant.Quantized(jnp.asarray(v), fmt) for k, v in p.items()}, limit, "ragged_dot",
                        every_row_grouped=True)
    block = (128, 128) if fmt == "fp8" else (1, 32)
    qw = {k: ref_quantize(v, block, fmt) for k, v in p.items()}
    xq = ref_quantize(xs, (1, 128), "fp8")
    want, start = np.zeros((m, d)), 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        h = np.asarray(swiglu(jnp.asarray(xq[rows] @ qw["w1"][g].T, jnp.float32),
                              jnp.asarray(xq[rows] @ qw["w3"][g].T, jnp.float32), jnp.asarray(wts[rows]), limit))
        want[rows] = ref_quantize(h, (1, 128), "fp8") @ qw["w2"][g].T
        start += n
    assert rel(got, want) <= 1e-6


def test_for_training_wraps_the_release_formats():
    config = CONFIGS["a"]
    params = init_params(config, seed=0)
    assert schema.for_training(params, config, "bf16") is params
    fp8 = schema.for_training(params, config, "fp8")
    qat = schema.for_training(params, config, "fp8+fp4qat")
    for tree, experts in ((fp8, "fp8"), (qat, "fp4")):
        attn, ffn = tree["layers"][2]["attn"], tree["layers"][2]["ffn"]
        assert all(isinstance(attn[k], quant.Quantized) and attn[k].fmt == "fp8" for k in ("wq_a", "wq_b", "wkv",
                                                                                           "wo_b"))
        assert not isinstance(attn["wo_a"], quant.Quantized)  # bf16 in V4: its weight only is quantised
        assert {ffn["experts"][k].fmt for k in ("w1", "w2", "w3")} == {experts}
        assert {ffn["shared_experts"][k].fmt for k in ("w1", "w2", "w3")} == {"fp8"}
        assert not isinstance(tree["head"], quant.Quantized) and not isinstance(ffn["gate"]["weight"],
                                                                                quant.Quantized)
    with pytest.raises(ValueError, match=r"train.precision='fp16': one of bf16, fp8, fp8\+fp4qat"):
        schema.for_training(params, config, "fp16")


@pytest.mark.parametrize("precision", ["fp8", "fp8+fp4qat"])
def test_training_with_precision_keeps_fp32_master_weights(precision):
    """A Muon/AdamW step on the quantised forward: the loss moves by the quantisation (not zero, not
    much on this small model), the update is finite, and parameters and optimizer state stay fp32."""
    config = CONFIGS["a"]
    params = init_params(config, seed=0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(config).items()}
    cfg = TrainConfig(steps=10, warmup_steps=0, precision=precision, dtype="bfloat16")  # lr > 0 at step 0
    plain = float(loss_fn(params, batch, config, TrainConfig(steps=10, dtype="bfloat16"), 0)[0])
    quantised = float(loss_fn(params, batch, config, cfg, 0)[0])
    assert 1e-5 < abs(quantised - plain) / plain < 0.05, (quantised, plain)
    opt = make_optimizer(cfg, config)
    state, metrics = make_train_step(config, cfg, opt)(init_state(jax.tree.map(jnp.copy, params), opt), batch)
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
    leaves = jax.tree.leaves((state["params"], state["opt_state"]))
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in floats)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["params"]["layers"][2]["ffn"]["experts"],
                         params["layers"][2]["ffn"]["experts"])
    assert all(jax.tree.leaves(moved))  # the straight-through gradient reached the master weights


def test_precision_is_checked_with_the_config():
    with pytest.raises(ConfigError, match=r"train.precision='int8' is not allowed: bf16 \| fp8 \| fp8\+fp4qat"):
        TrainConfig(precision="int8")


def test_quantised_training_on_a_mesh_matches_one_device():
    """fp8+fp4qat on fsdp 2 x expert 2 (the experts' FP4 blocks on sharded weights, the capacity
    all_to_all) and on context 2 x expert 2: the loss and gradients of one device, fp32."""
    config = CONFIGS["a"]
    params = init_params(config, seed=0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(config).items()}
    cfg = TrainConfig(steps=10, precision="fp8+fp4qat")

    def run(params, par=None, mesh=None):
        f = jax.value_and_grad(lambda p, b: loss_fn(p, b, config, cfg, 0, par, mesh)[0], allow_int=True)
        if mesh is not None:
            params = jax.device_put(params, param_shardings(params, mesh, config))
        return jax.jit(f)(params, batch)

    want_loss, want_grads = run(params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads) if g.dtype == jnp.float32)
    for shape in ((1, 2, 2, 1, 1), (1, 1, 2, 1, 2)):  # data, fsdp, expert, tensor, context
        par = ParallelConfig(*shape[:4], context=shape[4], capacity_factor=8.0)
        loss, grads = run(params, par, make_mesh(par, jax.devices()[:4]))
        assert rel(loss, want_loss) <= 1e-5, shape
        err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads))
                  if w.dtype == jnp.float32)
        assert err / scale <= 1e-5, (shape, err / scale)


def test_indexer_queries_and_keys_rotated_and_in_fp4():
    """train.indexer_fp4 (spec §2.11): x times the orthonormal Hadamard matrix (Sylvester's order,
    scipy's), then FP4 in 1 x 32 blocks; the rotation keeps dot products before the rounding."""
    import scipy.linalg

    h = scipy.linalg.hadamard(128) / np.sqrt(128)
    np.testing.assert_allclose(quant.hadamard(128), h, atol=1e-7)
    x = np.random.default_rng(6).normal(size=(2, 5, 3, 128)).astype(np.float32)
    got = quant.indexer_qk(jnp.asarray(x), quant.IndexerQK("fp4"))
    want = ref_quantize((x.reshape(-1, 128) @ h), (1, 32), "fp4").reshape(x.shape)
    assert rel(got, want) <= 1e-6
    with pytest.raises(ValueError, match="power-of-two width, got 48"):
        quant.hadamard(48)


def test_indexer_fp4_in_training():
    """The marker reaches every indexer; the indexer's loss moves (its scores are quantised) and its
    gradients stay finite; a head width the rotation cannot take is refused with the config."""
    from v4jax.trainer import RunConfig, load_run_config

    config = CONFIGS["a"]
    params = init_params(config, seed=0)
    marked = schema.for_training(params, config, "fp8+fp4qat", indexer_fp4=True)
    with_indexer = [i for i, lp in enumerate(params["layers"]) if "indexer" in lp["attn"]]
    assert with_indexer and all(marked["layers"][i]["attn"]["indexer"]["qk"] == quant.IndexerQK("fp4")
                                for i in with_indexer)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(config).items()}
    terms = {}
    for fp4 in (False, True):
        cfg = TrainConfig(steps=10, precision="fp8+fp4qat", indexer_fp4=fp4)
        (_, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(
            params, batch, config, cfg, 0)
        terms[fp4] = float(metrics["indexer_loss"])
        for i in with_indexer:
            g = jax.tree.leaves(grads["layers"][i]["attn"]["indexer"])
            assert all(bool(jnp.all(jnp.isfinite(a))) for a in g) and any(bool(jnp.any(a != 0)) for a in g)
    assert terms[True] != terms[False] and np.isfinite(terms[True])
    run = load_run_config("configs/tiny.yaml")
    with pytest.raises(ConfigError, match="model.index_head_dim a power of two, got 48"):
        RunConfig(run.model.replace(index_head_dim=48), run.train.__class__(indexer_fp4=True), run.data)


# --------------------------------------------------------------------------------------------------
# Weights kept as stored (quant.BlockScaled): decoding, and what V4-Flash then needs per device


@pytest.mark.parametrize("fmt,shape", [("fp8", (2, 200, 300)), ("fp8", (128, 256)), ("fp4", (3, 5, 80)),
                                       ("fp4", (7, 64))])
def test_block_scaled_decodes_as_the_independent_decoder(fmt, shape):
    """Random code bytes (NaN codes left out) and E8M0 scales, with partial edge blocks, against the
    bit-layout decoder of test_convert_quant (float64): equal in fp32, and bf16 holds them exactly."""
    from tests.test_convert_quant import ref_dequant_fp4, ref_dequant_fp8

    rng = np.random.default_rng(1)
    spec = quant.block_scaled_spec(shape, fmt)
    codes_shape, scales_shape = spec.codes.shape, spec.scales.shape
    codes = rng.integers(0, 256, codes_shape, dtype=np.uint8)
    if fmt == "fp8":
        codes[(codes & 0x7F) == 0x7F] = 0x12  # e4m3fn's NaN codes
    scales = rng.integers(100, 150, scales_shape, dtype=np.uint8)
    w = quant.BlockScaled(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn) if fmt == "fp8" else codes),
                          jnp.asarray(scales.view(ml_dtypes.float8_e8m0fnu)), fmt)
    assert w.shape == shape
    got = np.asarray(jax.jit(lambda w: w.values(jnp.float32))(w))
    ref = ref_dequant_fp8 if fmt == "fp8" else ref_dequant_fp4
    lead = shape[:-2]
    for i in np.ndindex(*lead):
        want = ref(codes[i], 2.0 ** (scales[i].astype(np.float64) - 127))
        np.testing.assert_array_equal(got[i], want)
    np.testing.assert_array_equal(np.asarray(w.values(jnp.bfloat16)).astype(np.float32), got)


@pytest.mark.parametrize("fmt,shape", [("fp8", (200, 300)), ("fp8", (2, 128, 256)), ("fp4", (5, 80)),
                                       ("fp4", (3, 7, 64))])
def test_block_scaled_encodes_as_the_converter(fmt, shape):
    """``quant.block_scaled`` (on the devices) gives the codes and scales of the converter's numpy
    encoder (``v4jax.convert.quant``, tested against an independent decoder), blocks of many
    magnitudes and a zero block included (whose scale may differ: both decode to zeros)."""
    from v4jax.convert import quant as host

    x = blocky(np.random.default_rng(2), shape, (128, 128) if fmt == "fp8" else (1, 32))
    got = jax.jit(lambda x: quant.block_scaled(x, fmt))(jnp.asarray(x))
    encode = host.quant_fp8 if fmt == "fp8" else host.quant_fp4
    for i in np.ndindex(*shape[:-2]):
        codes, scales = encode(x[i])
        np.testing.assert_array_equal(np.asarray(got.codes[i]).view(np.uint8), codes.view(np.uint8))
        s = np.asarray(got.scales[i]).view(np.uint8)
        zero = scales.view(np.uint8) == 0  # the converter's 2^-127 for a block of zeros
        np.testing.assert_array_equal(s[~zero], scales.view(np.uint8)[~zero])
        decode = host.dequant_fp8(codes, scales) if fmt == "fp8" else host.dequant_fp4(codes, scales)
        np.testing.assert_array_equal(np.asarray(got.values(jnp.float32)[i]), decode)


def test_v4_flash_kept_quantised_fits_8_h100s_and_a_v6e_8():
    """V4-Flash's parameters as the release stores them (experts FP4, the FP8 matrices FP8, the rest
    bf16 / fp32): the total equals the spec's byte count (§3.3: FP4 half a byte a weight plus one E8M0
    scale per 32; FP8 one byte plus one scale per 128 x 128 block), and the bytes per device on 8
    devices, abstract shapes on 8 fake devices: 8 H100s as expert 8: 25.92 GiB (bf16: 80.00 GiB, which
    does not fit an 80 GB H100); a v6e-8 as tensor 8: 19.53 GiB (bf16: 68.95 GiB; a v6e chip has 32 GB)."""
    from v4jax.model import param_specs, stored_specs
    from v4jax.schema import tree_infos
    from v4jax.trainer import load_run_config

    config = load_run_config("configs/v4-flash.yaml", []).model
    kept, dense = stored_specs(config, jnp.bfloat16), param_specs(config, jnp.bfloat16)

    def spec_bytes(info):
        n = int(np.prod(info.shape))
        if info.export not in ("experts", "fp8"):
            return n * info.dtype(jnp.bfloat16).itemsize
        *lead, o, i = info.shape
        lead = int(np.prod(lead))
        if info.export == "experts":
            return n // 2 + lead * o * -(-i // 32)
        return n + lead * -(-o // 128) * -(-i // 128)

    nbytes = lambda tree: sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(tree))  # noqa: E731
    want = sum(spec_bytes(i) for i in jax.tree.leaves(tree_infos(config, dense)))
    assert nbytes(kept) == want
    print(f"V4-Flash kept quantised: {want / 1e9:.2f} GB (bf16: {nbytes(dense) / 1e9:.2f} GB)")

    def per_device(specs, axis):
        mesh = jax.make_mesh((8,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))
        leaves, places = jax.tree.leaves(specs), jax.tree.leaves(param_shardings(specs, mesh, config))
        return sum(int(np.prod(p.shard_shape(s.shape))) * s.dtype.itemsize for s, p in zip(leaves, places)) / 2**30

    for axis, limit, name in (("expert", 80e9 / 2**30, "8 H100s"), ("tensor", 32e9 / 2**30, "a v6e-8")):
        got, full = per_device(kept, axis), per_device(dense, axis)
        print(f"{name} ({axis} 8): {got:.2f} GiB a device kept quantised, {full:.2f} GiB in bf16")
        assert want / 8 / 2**30 <= got < 0.85 * limit < full
