"""Checkpoint conversion end to end: safetensors (both layouts, FP8/FP4) <-> Orbax, through the CLI.

A tiny random model is built with transformers (the independent reference) and written

* in the transformers layout, by ``save_pretrained`` (fp32, no MTP block);
* in the release's layout, by this file: names mapped by the small table below (not the library's),
  an MTP block added, the release's FP8 matrices and FP4 experts quantised by a quantiser written
  here (128×128 E8M0 block scales / packed e2m1 with a scale per 32 inputs; one FP8 tensor with F32
  scales), other weights in BF16, fp32-kept tensors in F32, tid2eid in I64; three shards + index.

The reference logits come from transformers run on the *dequantised* weights (decoded by the
independent decoder of ``test_convert_quant``). hidden_size 160 and moe_intermediate_size 48 make
partial FP8 edge blocks and partial FP4 scale groups.

Tolerances: logits max |ours - reference| / max |reference| <= 1e-5 in fp32 (as the parity test);
dequantised weights and every round trip: bit equality.
"""

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

import v4jax
from tests import hf_oracle
from tests.helpers import rel
from tests.test_convert_quant import E2M1_TABLE, E4M3_TABLE, ref_dequant_fp4, ref_dequant_fp8
from v4jax.config import CSA, ModelConfig
from v4jax.convert.__main__ import main as cli

TOLERANCE = 1e-5
CONFIG = ModelConfig.from_dict(dict(
    vocab_size=97, hidden_size=160, num_attention_heads=4, head_dim=16, qk_rope_head_dim=8, q_lora_rank=16,
    o_groups=2, o_lora_rank=8, index_n_heads=16, index_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=48, num_hidden_layers=3, layer_types=("swa", "csa", "hca"),
    compress_rates={"csa": 4, "hca": 8}, sliding_window=8, index_topk=3, num_hash_layers=1, hc_mult=2))
SEQ = 21

# The release's formats (spec §3.2), by official name.
FP8_RE = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
                    r"|mtp\.0\.[eh]_proj)\.weight$")
FP4_RE = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
F32_RE = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")
F32_SCALE = "layers.1.ffn.shared_experts.w2.weight"  # stored with F32 scales, as Base checkpoints reportedly do


def hf_to_official(name: str) -> str:
    """The four differences of transformers' save_pretrained layout (written out independently here)."""
    name = {"model.embed_tokens.weight": "embed.weight"}.get(name, name)
    name = re.sub(r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1", name)
    name = re.sub(r"^model\.(layers\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight", name)
    return re.sub(r"^model\.", "", name)


# --------------------------------------------------------------------------------------------------
# The test's own quantiser (nearest code by search over the code table; block scale 2^ceil(log2(amax/max)))


def _exponent(amax, max_code):
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / max_code)).astype(np.int64)
    return np.where(amax > 0, e, -127)


def _nearest(x, table):
    codes = np.flatnonzero(np.isfinite(table))
    out = np.empty(x.size, np.uint8)
    flat = x.reshape(-1)
    for i in range(0, flat.size, 4096):
        d = np.abs(flat[i:i + 4096, None] - table[codes][None, :])
        out[i:i + 4096] = codes[np.argmin(d, axis=1)]
    return out.reshape(x.shape)


def quantise_fp8(w):
    r, c = w.shape
    rb, cb = -(-r // 128), -(-c // 128)
    e = np.zeros((rb, cb), np.int64)
    codes = np.zeros((r, c), np.uint8)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            e[i, j] = _exponent(np.abs(blk).max(), 448.0)
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = _nearest(blk / 2.0 ** e[i, j], E4M3_TABLE)
    return codes, (e + 127).astype(np.uint8)


def quantise_fp4(w):
    r, c = w.shape
    g = -(-c // 32)
    e = np.zeros((r, g), np.int64)
    codes = np.zeros((r, c), np.uint8)
    for j in range(g):
        blk = w[:, j * 32:(j + 1) * 32]
        e[:, j] = _exponent(np.abs(blk).max(axis=1), 6.0)
        codes[:, j * 32:(j + 1) * 32] = _nearest(blk / 2.0 ** e[:, j:j + 1], E2M1_TABLE)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.astype(np.uint8), (e + 127).astype(np.uint8)


def _bf16_round(x):  # through torch's own fp32 -> bf16 cast (round to nearest even)
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).to(torch.float64).numpy()


def _t(array, dtype):
    return torch.from_numpy(np.ascontiguousarray(array)).view(dtype) if array.dtype == np.uint8 else \
        torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Fixtures: the reference, the two input layouts, the reference logits on dequantised weights


def _mtp_tensors(rng):
    from v4jax.convert.names import official_name, tree_paths  # only to list the MTP tensor names
    from v4jax.model import param_specs

    out = {}
    for path, spec in tree_paths(param_specs(CONFIG)["mtp"]):
        path = ("mtp",) + path
        names = [official_name(path, e) for e in range(spec.shape[0])] if "experts" in path else [official_name(path)]
        shape = spec.shape[1:] if "experts" in path else spec.shape
        for name in names:
            if len(shape) == 2:
                out[name] = rng.normal(0, shape[1] ** -0.5, shape)
            elif name.endswith("norm.weight"):
                out[name] = rng.normal(1, 0.1, shape)
            else:
                out[name] = rng.normal(0, 0.3, shape)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    reference = hf_oracle.make_reference(CONFIG, seed=11, directory=root / "hf")
    hf_names = list(load_file(root / "hf" / "model.safetensors"))
    tensors = {hf_to_official(k): v.astype(np.float64) for k, v in load_file(root / "hf" / "model.safetensors").items()}
    tensors.update(_mtp_tensors(np.random.default_rng(12)))

    stored, deq = {}, {}  # official name -> torch tensor on disk; official name -> float64 dequantised value
    for name, w in tensors.items():
        if name.endswith("tid2eid"):
            stored[name] = torch.from_numpy(w.astype(np.int64))
            deq[name] = w
        elif FP8_RE.search(name):
            codes, scale = quantise_fp8(w)
            values = np.vectorize(lambda b: 2.0 ** (int(b) - 127))(scale)
            stored[name] = _t(codes, torch.float8_e4m3fn)
            stem = name[: -len(".weight")]
            stored[stem + ".scale"] = (torch.from_numpy(values.astype(np.float32)) if name == F32_SCALE
                                       else _t(scale, torch.float8_e8m0fnu))
            deq[name] = ref_dequant_fp8(codes, values)
        elif FP4_RE.search(name):
            packed, scale = quantise_fp4(w)
            stored[name] = torch.from_numpy(packed.view(np.int8))
            stored[name[: -len(".weight")] + ".scale"] = _t(scale, torch.float8_e8m0fnu)
            deq[name] = ref_dequant_fp4(packed, 2.0 ** (scale.astype(np.float64) - 127))
        elif F32_RE.search(name):
            stored[name] = torch.from_numpy(w.astype(np.float32))
            deq[name] = w.astype(np.float32).astype(np.float64)
        else:
            stored[name] = torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16)
            deq[name] = _bf16_round(w)

    official = root / "official"
    official.mkdir()
    names = sorted(stored)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    for file, keys in shards.items():
        save_file({k: stored[k].contiguous() for k in keys}, official / file, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (official / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    release = CONFIG.to_release_dict()
    release["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    release["expert_dtype"] = "fp4"
    (official / "config.json").write_text(json.dumps(release))

    # transformers on the dequantised weights
    hf_deq = root / "hf_deq"
    hf_deq.mkdir()
    save_file({k: torch.from_numpy(deq[hf_to_official(k)].astype(np.float32)) for k in hf_names},
              hf_deq / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(root / "hf" / "config.json", hf_deq / "config.json")
    from transformers import DeepseekV4ForCausalLM

    deq_reference = DeepseekV4ForCausalLM.from_pretrained(hf_deq, dtype=torch.float32).eval()
    deq_reference.config._attn_implementation = "eager"
    tokens = np.random.default_rng(13).integers(0, CONFIG.vocab_size, size=(2, SEQ))
    for ref in (reference, deq_reference):
        hf_oracle.assert_no_topk_ties(hf_oracle.indexer_scores(ref, tokens), CONFIG.index_topk, CONFIG.ratio[CSA])
    return dict(root=root, hf=root / "hf", official=official, deq=deq, tokens=tokens, hf_names=hf_names,
                expected_hf=hf_oracle.reference_logits(reference, tokens),
                expected_deq=hf_oracle.reference_logits(deq_reference, tokens))


def _flat(params):
    from v4jax.convert.names import tree_paths

    return {p: np.asarray(v) for p, v in tree_paths(params)}


def _deq_tree_value(deq, path, shape):
    from v4jax.convert.names import official_name

    if "experts" in path:
        return np.stack([deq[official_name(path, e)] for e in range(shape[0])])
    return deq[official_name(path)]


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.fixture(scope="module")
def orbax_official(world):
    dst = world["root"] / "orbax_official"
    assert cli(["to-orbax", "--src", str(world["official"]), "--dst", str(dst), "--dtype", "float32",
                "--no-progress"]) == 0
    return dst


@pytest.fixture(scope="module")
def orbax_hf(world):
    dst = world["root"] / "orbax_hf"
    with pytest.warns(UserWarning, match="no mtp"):
        assert cli(["to-orbax", "--src", str(world["hf"]), "--dst", str(dst), "--dtype", "float32",
                    "--no-progress"]) == 0
    return dst


# --------------------------------------------------------------------------------------------------
# safetensors -> Orbax -> from_pretrained


def test_official_fp8_fp4_to_orbax_matches_transformers(world, orbax_official):
    marker = json.loads((orbax_official / "v4jax_checkpoint.json").read_text())
    assert marker["source_layout"] == "official" and marker["config_style"] == "release" and marker["has_mtp"]
    assert marker["formats"]["fp8"] > 0 and marker["formats"]["fp4"] > 0
    assert "compress_ratios" in json.loads((orbax_official / "config.json").read_text())

    model = v4jax.from_pretrained(orbax_official, dtype="float32")
    assert model.has_mtp and model.config == CONFIG
    err = rel(model.logits(world["tokens"]), world["expected_deq"])
    print(f"official FP8/FP4 -> Orbax: max relative logit error {err:.2e}")
    assert err <= TOLERANCE

    # every leaf, FP8 and FP4 ones included, equals the independent decoder's value bit for bit
    for path, value in _flat(model.params).items():
        want = _deq_tree_value(world["deq"], path, value.shape)
        if value.dtype == np.int32:
            np.testing.assert_array_equal(value, want.astype(np.int64), err_msg=str(path))
        else:
            assert value.dtype == np.float32, path
            np.testing.assert_array_equal(_bits(value), _bits(want.astype(np.float32)), err_msg=str(path))

    # the direct safetensors path (from_pretrained on the release layout) decodes the same bits
    direct = v4jax.from_pretrained(world["official"], dtype="float32")
    a, b = _flat(direct.params), _flat(model.params)
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(_bits(a[p]), _bits(b[p]), err_msg=str(p))


def test_bfloat16_orbax_holds_fp8_fp4_exactly(world, orbax_official):
    dst = world["root"] / "orbax_official_bf16"
    assert cli(["to-orbax", "--src", str(world["official"]), "--dst", str(dst), "--no-progress"]) == 0  # default bf16
    assert json.loads((dst / "v4jax_checkpoint.json").read_text())["dtype"] == "bfloat16"
    bf = _flat(v4jax.from_pretrained(dst, dtype="bfloat16").params)
    f32 = _flat(v4jax.from_pretrained(orbax_official, dtype="float32").params)
    for p, v in bf.items():
        assert v.dtype in (np.dtype(ml_dtypes.bfloat16), np.float32, np.int32), p
        np.testing.assert_array_equal(v.astype(np.float64), f32[p].astype(np.float64), err_msg=str(p))


def test_hf_layout_to_orbax_matches_transformers(world, orbax_hf):
    marker = json.loads((orbax_hf / "v4jax_checkpoint.json").read_text())
    assert marker["source_layout"] == "hf" and marker["config_style"] == "hf" and not marker["has_mtp"]
    assert "layer_types" in json.loads((orbax_hf / "config.json").read_text())
    model = v4jax.from_pretrained(orbax_hf, dtype="float32")
    assert not model.has_mtp
    err = rel(model.logits(world["tokens"]), world["expected_hf"])
    print(f"transformers layout -> Orbax: max relative logit error {err:.2e}")
    assert err <= TOLERANCE


def test_from_pretrained_orbax_on_a_mesh(orbax_official):
    import jax

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model = v4jax.from_pretrained(orbax_official, dtype="float32", mesh=mesh)
    leaf = model.params["layers"][1]["ffn"]["experts"]["w1"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


# --------------------------------------------------------------------------------------------------
# Orbax -> safetensors -> Orbax


def _read_with_safetensors(directory):
    """All tensors of a written checkpoint, through the safetensors library (an independent reader)."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(directory / file, framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == file
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def _assert_same_orbax(a, b):
    pa = _flat(v4jax.from_pretrained(a, dtype="float32").params)
    pb = _flat(v4jax.from_pretrained(b, dtype="float32").params)
    assert pa.keys() == pb.keys()
    for p in pa:
        assert pa[p].dtype == pb[p].dtype, p
        np.testing.assert_array_equal(_bits(pa[p]), _bits(pb[p]), err_msg=str(p))


def test_orbax_to_official_fp8_fp4_and_back_is_bit_exact(world, orbax_official, capsys):
    out = world["root"] / "st_fp8_fp4"
    assert cli(["to-safetensors", "--src", str(orbax_official), "--dst", str(out), "--layout", "official",
                "--quantize", "fp8+fp4", "--max-shard-size", "64KB", "--no-progress"]) == 0
    assert "routed experts 0.00%" in capsys.readouterr().out  # weights from the release: on the grid, no error
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s.name) for s in shards)
    tensors = _read_with_safetensors(out)
    for s in shards:  # bounded shards (a single tensor larger than the limit would get its own shard)
        with safe_open(s, framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
        assert sum(sizes) <= 64_000 or len(sizes) <= 2
    config = json.loads((out / "config.json").read_text())
    assert "compress_ratios" in config and config["expert_dtype"] == "fp4"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert ModelConfig.from_dict(config) == CONFIG

    # names, dtypes and values as released (decoded by the independent decoder)
    assert {k for k in tensors if not k.endswith(".scale")} == set(world["deq"])
    for name, t in tensors.items():
        if name.endswith(".scale"):
            assert t.dtype == torch.float8_e8m0fnu, name
            continue
        want = world["deq"][name]
        if FP8_RE.search(name):
            assert t.dtype == torch.float8_e4m3fn, name
            s = 2.0 ** (tensors[name[:-7] + ".scale"].view(torch.uint8).numpy().astype(np.float64) - 127)
            got = ref_dequant_fp8(t.view(torch.uint8).numpy(), s)
        elif FP4_RE.search(name):
            assert t.dtype == torch.int8, name
            s = 2.0 ** (tensors[name[:-7] + ".scale"].view(torch.uint8).numpy().astype(np.float64) - 127)
            got = ref_dequant_fp4(t.view(torch.uint8).numpy(), s)
        elif name.endswith("tid2eid"):
            assert t.dtype == torch.int64, name
            got = t.numpy()
        else:
            assert t.dtype == (torch.float32 if F32_RE.search(name) else torch.bfloat16), name
            got = t.to(torch.float64).numpy()
        np.testing.assert_array_equal(got, want, err_msg=name)

    back = world["root"] / "orbax_back"
    assert cli(["to-orbax", "--src", str(out), "--dst", str(back), "--dtype", "float32", "--no-progress"]) == 0
    _assert_same_orbax(orbax_official, back)


def test_orbax_to_fp8_base_layout_and_back_is_bit_exact(world, orbax_official):
    out = world["root"] / "st_fp8"
    assert cli(["to-safetensors", "--src", str(orbax_official), "--dst", str(out), "--quantize", "fp8",
                "--no-progress"]) == 0
    with safe_open(out / "model-00001-of-00001.safetensors", framework="pt") as f:
        assert f.get_tensor("layers.0.ffn.experts.3.w2.weight").dtype == torch.float8_e4m3fn
        assert tuple(f.get_tensor("layers.0.ffn.experts.3.w2.scale").shape) == (2, 1)
    back = world["root"] / "orbax_back_fp8"
    assert cli(["to-orbax", "--src", str(out), "--dst", str(back), "--dtype", "float32", "--no-progress"]) == 0
    _assert_same_orbax(orbax_official, back)


def test_orbax_to_hf_layout_loads_in_transformers(world, orbax_hf):
    out = world["root"] / "st_hf"
    assert cli(["to-safetensors", "--src", str(orbax_hf), "--dst", str(out), "--no-progress"]) == 0  # layout: as source
    config = json.loads((out / "config.json").read_text())
    assert "layer_types" in config and "compress_ratios" not in config
    assert set(_read_with_safetensors(out)) == set(world["hf_names"])
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    err = rel(hf_oracle.reference_logits(model, world["tokens"]), world["expected_hf"])
    assert err <= 1e-6


def test_official_orbax_to_hf_layout_drops_mtp_with_a_warning(world, orbax_official):
    out = world["root"] / "st_hf_from_official"
    with pytest.warns(UserWarning, match="no MTP block"):
        assert cli(["to-safetensors", "--src", str(orbax_official), "--dst", str(out), "--layout", "hf",
                    "--no-progress"]) == 0
    names = set(_read_with_safetensors(out))
    assert names == set(world["hf_names"]) and not any("mtp" in n for n in names)


def test_to_orbax_sharded_for_a_target_mesh(world, orbax_official):
    """--mesh: every Orbax chunk tiles one device's shard; restoring onto that mesh gives the same values."""
    import jax
    import tensorstore as ts

    from v4jax.convert.orbax_io import OrbaxParams, shard_shape
    from v4jax.model import param_specs
    from v4jax.parallel import ParallelConfig, make_mesh
    from v4jax.schema import info_at, param_shardings

    dst = world["root"] / "orbax_mesh"
    assert cli(["to-orbax", "--src", str(world["official"]), "--dst", str(dst), "--dtype", "float32",
                "--mesh", "fsdp=2,expert=2,tensor=2", "--block-mb", "0.01", "--no-progress"]) == 0
    stored = OrbaxParams(dst / "params")
    mesh_sizes = {"fsdp": 2, "expert": 2, "tensor": 2}
    w1 = ("layers", 1, "ffn", "experts", "w1")
    assert shard_shape(info_at(CONFIG, w1).axes, (4, 48, 160), mesh_sizes) == (2, 24, 80)
    for path, (shape, _) in stored.leaves.items():
        if len(shape) < 2:
            continue
        chunk = stored._store(path).chunk_layout.read_chunk.shape
        shard = shard_shape(info_at(CONFIG, path).axes, shape, mesh_sizes)
        assert all(s % c == 0 for s, c in zip(shard, chunk)), (path, shard, chunk)
        if path == w1:
            # 10 KiB blocks hold 16 rows of 160 fp32: 12 rows (a divisor of the shard's 24), one device's columns
            assert tuple(chunk) == (1, 12, 80)
    del ts

    mesh = make_mesh(ParallelConfig(data=1, fsdp=2, expert=2, tensor=2))
    specs = param_specs(CONFIG, np.float32)
    from v4jax.convert.orbax_io import restore_params

    sharded = restore_params(dst, specs, param_shardings(specs, mesh, CONFIG))
    leaf = sharded["layers"][1]["ffn"]["experts"]["w1"]
    assert leaf.sharding.shard_shape(leaf.shape) == (2, 24, 80)
    plain = _flat(v4jax.from_pretrained(orbax_official, dtype="float32").params)
    for p, v in _flat(jax.device_get(sharded)).items():
        np.testing.assert_array_equal(_bits(v), _bits(plain[p]), err_msg=str(p))


# --------------------------------------------------------------------------------------------------
# Weights kept as stored: from_pretrained(quantized=True), Model.save, to-orbax --keep-quantized


def _kept(params) -> dict:
    """{path: BlockScaled} of a parameter tree's weights kept quantised."""
    import jax

    from v4jax.params import path_keys
    from v4jax.quant import is_block_scaled

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_block_scaled)[0]
    return {path_keys(p): w for p, w in flat if is_block_scaled(w)}


def _tensors(directory) -> dict:
    """Every tensor of a safetensors directory, through the safetensors library."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _stored_bytes(tensors, name):
    """The file's bytes of tensor ``name`` (as uint8) and its scale's E8M0 bytes (from F32 values too)."""
    scale = tensors[name[:-len(".weight")] + ".scale"]
    if scale.dtype == torch.float32:
        scale_bytes = (np.log2(scale.numpy()).astype(np.int64) + 127).astype(np.uint8)
    else:
        scale_bytes = scale.view(torch.uint8).numpy()
    return tensors[name].view(torch.uint8).numpy(), scale_bytes


@pytest.fixture(scope="module")
def kept_model(world):
    return v4jax.from_pretrained(world["official"], dtype="float32", quantized=True)


def test_quantized_weights_are_held_as_stored_and_give_the_dequantised_logits(world, kept_model):
    """Every FP8/FP4 tensor of the release-layout checkpoint is held as its file's bytes (codes, E8M0
    scales; the F32-scaled one converted); the logits equal transformers' on the dequantised weights
    (1e-5) and the dequantised model's (1e-5, exactly in practice), MTP logits too."""
    from v4jax.convert.names import official_name

    tensors = _tensors(world["official"])
    kept = _kept(kept_model.params)
    quantised = {n for n in tensors if FP8_RE.search(n) or FP4_RE.search(n)}
    assert sum(w.codes.shape[0] if "experts" in p else 1 for p, w in kept.items()) == len(quantised)
    held = 0
    for path, w in kept.items():
        names = [official_name(path, e) for e in range(w.shape[0])] if "experts" in path else [official_name(path)]
        assert w.fmt == ("fp4" if "experts" in path else "fp8"), path
        for i, name in enumerate(names):
            codes, scales = _stored_bytes(tensors, name)
            at = (i,) if "experts" in path else ()
            np.testing.assert_array_equal(np.asarray(w.codes[at]).view(np.uint8), codes, err_msg=name)
            np.testing.assert_array_equal(np.asarray(w.scales[at]).view(np.uint8), scales, err_msg=name)
            held += codes.nbytes + scales.nbytes
    assert held == sum(w.codes.nbytes + w.scales.nbytes for w in kept.values())

    dense = v4jax.from_pretrained(world["official"], dtype="float32")
    # schema.as_stored re-encodes the dequantised weights at the same paths, to the same values
    from v4jax.schema import as_stored

    encoded = _kept(as_stored(dense.params, CONFIG))
    assert encoded.keys() == kept.keys()
    for path, w in encoded.items():
        assert w.fmt == kept[path].fmt, path
        np.testing.assert_array_equal(np.asarray(w.values(np.float32)), np.asarray(kept[path].values(np.float32)))
    got = kept_model.logits(world["tokens"])
    err_hf, err_dense = rel(got, world["expected_deq"]), rel(got, dense.logits(world["tokens"]))
    err_mtp = rel(kept_model.mtp_logits(world["tokens"]), dense.mtp_logits(world["tokens"]))
    print(f"weights kept FP8/FP4: logits vs transformers {err_hf:.2e}, vs the dequantised model {err_dense:.2e}, "
          f"MTP {err_mtp:.2e}")
    assert err_hf <= TOLERANCE and err_dense <= TOLERANCE and err_mtp <= TOLERANCE


def test_quantized_model_on_a_mesh_and_generating(world, kept_model):
    """fsdp 2 x expert 2 x tensor 2: the codes are sharded, the logits equal one device's (1e-5) and
    greedy generation equals the dequantised model's, sharded or not; on expert 8 (experts padded)
    the logits equal one device's too."""
    from v4jax.parallel import ParallelConfig, make_mesh

    mesh = make_mesh(ParallelConfig(data=1, fsdp=2, expert=2, tensor=2))
    sharded = v4jax.from_pretrained(world["official"], dtype="float32", quantized=True, mesh=mesh)
    w1 = sharded.params["layers"][1]["ffn"]["experts"]["w1"]
    assert w1.codes.sharding.shard_shape(w1.codes.shape) == (2, 24, 40)  # [e, f, d/2] over expert, tensor, fsdp
    err = rel(sharded.logits(world["tokens"]), kept_model.logits(world["tokens"]))
    print(f"weights kept FP8/FP4 on 8 devices: logits vs one device {err:.2e}")
    assert err <= TOLERANCE
    prompts = [list(map(int, world["tokens"][0, :7])), list(map(int, world["tokens"][1, :4]))]
    dense = v4jax.from_pretrained(world["official"], dtype="float32")
    want = dense.generate(prompts, 10, temperature=0.0, stop_tokens=[])
    assert kept_model.generate(prompts, 10, temperature=0.0, stop_tokens=[]) == want
    assert sharded.generate(prompts, 10, temperature=0.0, stop_tokens=[]) == want
    # expert 8 over 4 experts: the kept experts are padded (zero codes) to the mesh, 2 rows over 8
    padded = v4jax.from_pretrained(world["official"], dtype="float32", quantized=True,
                                   mesh=make_mesh(ParallelConfig(data=1, fsdp=1, expert=8, tensor=1)))
    err = rel(padded.logits(world["tokens"]), kept_model.logits(world["tokens"]))
    print(f"weights kept FP8/FP4, 4 experts on expert 8: logits vs one device {err:.2e}")
    assert err <= TOLERANCE


def test_quantized_model_saves_restores_and_exports_as_stored(world, kept_model, tmp_path):
    """Model.save writes the kept weights as codes and scales: restored with quantized=True they are
    the same bytes, without it the dequantised model's values; to-safetensors re-quantises them to the
    release's files (the same codes and scales)."""
    kept_model.save(tmp_path / "kept")
    assert json.loads((tmp_path / "kept" / "v4jax_checkpoint.json").read_text())["quantized"]
    again = v4jax.from_pretrained(tmp_path / "kept", dtype="float32", quantized=True)
    a, b = _flat(kept_model.params), _flat(again.params)
    assert a.keys() == b.keys() and any(p[-1] == "codes" for p in a)
    for p in a:
        assert a[p].dtype == b[p].dtype, p
        np.testing.assert_array_equal(a[p].view(np.uint8), b[p].view(np.uint8), err_msg=str(p))
    decoded = _flat(v4jax.from_pretrained(tmp_path / "kept", dtype="float32").params)
    direct = _flat(v4jax.from_pretrained(world["official"], dtype="float32").params)
    assert decoded.keys() == direct.keys()
    for p in direct:
        np.testing.assert_array_equal(_bits(decoded[p]), _bits(direct[p]), err_msg=str(p))

    out = tmp_path / "st"
    assert cli(["to-safetensors", "--src", str(tmp_path / "kept"), "--dst", str(out), "--quantize", "fp8+fp4",
                "--no-progress"]) == 0
    written, original = _read_with_safetensors(out), _tensors(world["official"])
    for name in original:
        if FP8_RE.search(name) or FP4_RE.search(name):
            for got, want in zip(_stored_bytes(written, name), _stored_bytes(original, name)):
                np.testing.assert_array_equal(got, want, err_msg=name)


def test_to_orbax_keep_quantized(world, kept_model):
    """--keep-quantized (here with --mesh): the Orbax directory holds codes and scales, chunked per
    device shard, a fraction of the dequantised directory's size; it loads as the safetensors did."""
    from v4jax.convert.orbax_io import OrbaxParams

    dst = world["root"] / "orbax_kept"
    assert cli(["to-orbax", "--src", str(world["official"]), "--dst", str(dst), "--dtype", "float32",
                "--keep-quantized", "--mesh", "expert=2,tensor=2", "--no-progress"]) == 0
    assert json.loads((dst / "v4jax_checkpoint.json").read_text())["quantized"]
    stored = OrbaxParams(dst / "params")
    w1 = ("layers", 1, "ffn", "experts", "w1", "codes")
    assert stored.leaves[w1] == ((4, 48, 80), np.dtype(np.uint8))
    assert tuple(stored._store(w1).chunk_layout.read_chunk.shape) == (1, 24, 80)  # one device's rows
    loaded = v4jax.from_pretrained(dst, dtype="float32", quantized=True)
    a, b = _flat(kept_model.params), _flat(loaded.params)
    assert a.keys() == b.keys()
    for p in a:
        np.testing.assert_array_equal(a[p].view(np.uint8), b[p].view(np.uint8), err_msg=str(p))


def test_quantized_refusals(world, tmp_path):
    """quantized=True: a checkpoint without FP8/FP4 weights warns (nothing kept), a train.py run is
    refused, and an F32 scale that is no power of two (not an E8M0 value) is refused naming it."""
    import warnings

    from safetensors.torch import load_file as load_torch

    from v4jax.convert.safetensors_io import CheckpointError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = v4jax.from_pretrained(world["hf"], dtype="float32", quantized=True)
    assert not plain.quantized and any("stores no FP8/FP4 weights" in str(w.message) for w in caught)

    bad = tmp_path / "bad"
    shutil.copytree(world["official"], bad)
    scale = F32_SCALE[:-len(".weight")] + ".scale"
    file = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][scale]
    tensors = load_torch(file)
    tensors[scale] = tensors[scale] * 1.5
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(scale) + ".*not powers of two"):
        v4jax.from_pretrained(bad, dtype="float32", quantized=True)
    v4jax.from_pretrained(bad, dtype="float32")  # dequantised, any F32 scale is fine
