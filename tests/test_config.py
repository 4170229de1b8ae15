"""ModelConfig: presets, both config.json styles, round trips, and refusal of bad values."""

import json

import pytest

from v4jax.config import CSA, HCA, SWA, ConfigError, ModelConfig, model_config_from_yaml
from v4jax.model import param_count

# The release's published inventory (spec §3.1), independent of our code.
RELEASED = {
    "v4-flash": {"total": 290.94e9, "mtp": 6.61e9, "active": 13.80e9},
    "v4-pro": {"total": 1598.8e9, "mtp": 25.8e9, "active": 49.78e9},
}


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_release_presets_match_the_published_parameter_counts(name):
    counts = param_count(model_config_from_yaml(f"configs/{name}.yaml"))
    for key, want in RELEASED[name].items():
        assert abs(counts[key] - want) / want < 0.002, (key, counts[key], want)


def test_flash_layer_pattern():
    c = model_config_from_yaml("configs/v4-flash.yaml")
    assert c.layer_types[:2] == (SWA, SWA) and c.mtp_layer_type == SWA
    assert all(t == (CSA if i % 2 == 0 else HCA) for i, t in enumerate(c.layer_types) if i >= 2)
    assert c.layer_ratio(2) == 4 and c.layer_ratio(3) == 128 and c.layer_ratio(43) == 0


def test_pro_layer_pattern():
    c = model_config_from_yaml("configs/v4-pro.yaml")
    assert c.layer_types[:2] == (HCA, HCA) and c.layer_types[60] == CSA and c.mtp_layer_type == SWA


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash", "v4-pro"])
def test_round_trips_through_both_styles(name):
    c = model_config_from_yaml(f"configs/{name}.yaml")
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_release_dict()))) == c
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_hf_dict()))) == c


def test_transformers_reads_our_hf_style():
    from transformers import DeepseekV4Config

    c = model_config_from_yaml("configs/small.yaml")
    hf = DeepseekV4Config(**c.to_hf_dict())
    assert tuple(hf.layer_types) == c.layer_types and hf.compress_rates == dict(c.compress_rates)
    assert hf.mlp_layer_types == ["hash_moe"] * 2 + ["moe"] * 10 and hf.qk_rope_head_dim == 64
    assert hf.rope_parameters["compress"]["rope_type"] == "yarn"


def test_release_config_json():
    """The release's config.json fields (spec §1.1), as shipped."""
    raw = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
           "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
           "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
           "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000,
           "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings":
                                                 65536, "beta_fast": 32, "beta_slow": 1},
           "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
           "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
           "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
           "routed_scaling_factor": 1.5, "num_hash_layers": 3, "swiglu_limit": 10.0, "hc_mult": 4,
           "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
           "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
           "torch_dtype": "bfloat16", "expert_dtype": "fp4", "bos_token_id": 0, "eos_token_id": 1,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                   "weight_block_size": [128, 128], "activation_scheme": "dynamic"}}
    assert ModelConfig.from_dict(raw) == model_config_from_yaml("configs/v4-flash.yaml")


@pytest.mark.parametrize("change, field", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"o_groups": 3}, "o_groups"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
    ({"layer_types": ["swa", "csa"]}, "layer_types"),
    ({"layer_types": ["swa", "csa", "mla", "hca"]}, "layer_types"),
    ({"compress_rates": {"csa": 0}}, "compress_rates"),
    ({"compress_rates": {"xyz": 4}}, "compress_rates"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"num_hash_layers": 9}, "num_hash_layers"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_sise": 64}, "hidden_sise"),
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "mlp_layer_types"),
    ({"compress_ratios": [0, 4, 8, 16, 0]}, "compress_ratios"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "original_max_position_embeddings"),
])
def test_bad_values_are_refused_by_name(change, field):
    raw = {k: v for k, v in json.loads(json.dumps(model_config_from_yaml("configs/tiny.yaml").to_hf_dict())).items()}
    raw.update(change)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        model_config_from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "bad.yaml").write_text("train: {}\n")
    with pytest.raises(ConfigError, match="model:"):
        model_config_from_yaml(tmp_path / "bad.yaml")


def test_mtp_layer_type_survives_both_styles():
    c = model_config_from_yaml("configs/tiny.yaml").replace(mtp_layer_type="csa")
    assert ModelConfig.from_dict(c.to_hf_dict()) == c
    assert ModelConfig.from_dict(c.to_release_dict()) == c


def test_release_style_refuses_what_it_cannot_express():
    c = model_config_from_yaml("configs/tiny.yaml").replace(compress_rates={"csa": 2, "hca": 8})
    with pytest.raises(ConfigError, match="release's config.json style"):
        c.to_release_dict()
    assert ModelConfig.from_dict(c.to_hf_dict()) == c


def test_no_rope_scaling_means_no_yarn():
    """As in the official ModelArgs (original_seq_len=0) and transformers: without rope_scaling the
    compressed layers rotate with the plain compress_rope_theta frequencies."""
    import numpy as np

    from v4jax.layers import rope_frequencies

    raw = model_config_from_yaml("configs/tiny.yaml").to_release_dict()
    del raw["rope_scaling"]
    c = ModelConfig.from_dict(raw)
    assert c.rope_scaling is None
    layer = c.layer_types.index(CSA)
    dim = c.qk_rope_head_dim
    want = 1.0 / c.compress_rope_theta ** (np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(rope_frequencies(c, layer), want, rtol=1e-6)
    assert ModelConfig.from_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("factor", [None, 1.2772, 2.0])
def test_a_yarn_attention_factor_other_than_one_is_refused(factor):
    """transformers scales cos/sin by attention_factor (0.1 ln(factor) + 1 when absent); the release
    does not, so anything but 1.0 is refused with the field's name rather than silently dropped."""
    raw = model_config_from_yaml("configs/tiny.yaml").to_hf_dict()
    compress = raw["rope_parameters"]["compress"]
    compress.pop("attention_factor")
    if factor is not None:
        compress["attention_factor"] = factor
    with pytest.raises(ConfigError, match="attention_factor"):
        ModelConfig.from_dict(raw)
    compress["attention_factor"] = 1.0
    assert ModelConfig.from_dict(raw).rope_scaling is not None


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("-2E3", -2000.0), ("+1e5", 1e5), ("1.0e-4", 1e-4),
                                         ("3", 3), ("1_000", 1000), (".inf", float("inf")), ("1e", "1e")])
def test_yaml_reads_exponent_floats_as_numbers(text, value):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; configs and overrides read it as the number."""
    from v4jax.config import parse_yaml

    assert parse_yaml(text) == value and type(parse_yaml(text)) is type(value)


def test_train_override_with_exponent_is_accepted(tmp_path):
    from v4jax.trainer import load_run_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {num_hidden_layers: 2, num_hash_layers: 0, layer_types: [swa, swa]}\n"
                    "train: {lr_min: 1e-5}\n")
    run = load_run_config(path, ["train.lr=1e-4"])
    assert run.train.lr == 1e-4 and run.train.lr_min == 1e-5


@pytest.mark.parametrize("style, change, message", [
    ("release", {"rope_scaling": "yarn"}, "rope_scaling='yarn' is not allowed: a mapping"),
    ("release", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
    ("release", {"rope_scaling": {"factor": "16", "original_max_position_embeddings": 8}}, "rope_scaling.factor="),
    ("release", {"hidden_size": "32"}, "hidden_size='32' is not allowed: an integer"),
    ("release", {"num_hidden_layers": "4"}, "num_hidden_layers='4' is not allowed: an integer"),
    ("release", {"rope_theta": "1e4"}, "rope_theta='1e4' is not allowed: a finite number"),
    ("release", {"swiglu_limit": None}, "swiglu_limit=None is not allowed: a finite number"),
    ("release", {"hc_eps": float("nan")}, "hc_eps=nan"),
    ("release", {"norm_topk_prob": 1}, "norm_topk_prob=1 is not allowed: true or false"),
    ("release", {"max_position_embeddings": 0}, "max_position_embeddings=0 is not allowed"),
    ("release", {"eos_token_id": []}, "eos_token_id"),
    ("hf", {"rope_parameters": "yarn"}, "rope_parameters must be a mapping"),
    ("hf", {"mlp_layer_types": 3}, "mlp_layer_types must be a list"),
    ("hf", {"partial_rotary_factor": "0.5", "qk_rope_head_dim": None}, "partial_rotary_factor='0.5'"),
])
def test_wrong_types_in_config_json_are_refused_by_name(tmp_path, style, change, message):
    """config.json values of the wrong type: one ConfigError naming the file and the field, never a
    raw TypeError from deep inside (or, worse, a string silently used as a number)."""
    config = model_config_from_yaml("configs/tiny.yaml")
    raw = config.to_release_dict() if style == "release" else config.to_hf_dict()
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None or k == "swiglu_limit"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"{path}: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_json(path)


def test_model_config_from_yaml(tmp_path):
    config = ModelConfig.from_yaml("configs/tiny.yaml")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 4, 512)  # as the file says
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: '64'}\n")
    with pytest.raises(ConfigError, match=f"{bad}: hidden_size='64' is not allowed: an integer"):
        ModelConfig.from_yaml(bad)
