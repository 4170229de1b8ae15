"""Model configuration: one frozen dataclass, read from YAML or from a checkpoint's config.json.

Two config.json styles exist for DeepSeek-V4 and both are read here:

* the release's (``compress_ratios`` per layer with the MTP layer last, ``num_hash_layers``,
  ``qk_rope_head_dim``, ``rope_scaling``);
* the Hugging Face ``transformers`` one (``layer_types``, ``compress_rates``,
  ``mlp_layer_types``, ``rope_parameters`` with ``main``/``compress``).

Internally a layer's attention kind is one of ``SWA``, ``CSA`` or ``HCA`` (``layer_types``), and the
compression ratio of each kind is free (``compress_rates``): the release uses 4 and 128.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
from pathlib import Path
from typing import Any

import yaml

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SWA, CSA, HCA)
_SHORT_TYPES = {"swa": SWA, "csa": CSA, "hca": HCA}


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range. The message names the field."""


_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def _is(kind: str, value) -> bool:
    """Whether ``value`` is of the scalar ``kind`` (a key of _KINDS). bool is not an int here, a
    string never a number: config.json and YAML say "1" or 1 for a reason."""
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, bool if kind == "bool" else str)


def _check_types(values: dict[str, Any], kinds: dict[str, str], prefix: str = "") -> None:
    """Refuse the first value whose field has a scalar kind it does not have, by name."""
    for name, value in values.items():
        kind = kinds.get(name)
        if kind in _KINDS and not _is(kind, value):
            raise ConfigError(f"{prefix}{name}={value!r} is not allowed: {_KINDS[kind]}")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency blend used by the compressed (CSA/HCA) layers. No attention temperature."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


ENGRAM_FORMS = ("paper", "v4.1")
ENGRAM_TOKENIZERS = ("deepseek", "bytes", "none")


@dataclasses.dataclass(frozen=True)
class EngramConfig:
    """Engram conditional memory (``v4jax.engram``): the ``model.engram`` section of a YAML config,
    ``engram_*`` keys in config.json. Absent (the default, and the V4 presets): no Engram."""

    layers: tuple[int, ...] = (1,)  # layer ids; the memory is added to the streams before the block
    max_ngram: int = 3  # n-gram orders 2..max_ngram
    heads: int = 8  # hash heads per order, each with its own prime-sized table
    head_dim: int = 64  # width of a table row
    table_size: int = 646400  # rows per head: the smallest unused prime >= this
    form: str = "paper"  # paper: per-stream keys and a short conv | v4.1: one wkv, no conv
    conv_kernel: int = 4  # taps of the paper form's causal depthwise conv (dilation: max_ngram)
    tokenizer: str = "deepseek"  # whose ids are compressed (deepseek | bytes | none: no compression)
    seed: int = 0  # of the hash multipliers

    def validate(self, num_hidden_layers: int) -> None:
        def need(ok, field, allowed):
            if not ok:
                raise ConfigError(f"model.engram.{field}={getattr(self, field)!r} is not allowed: {allowed}")

        need(isinstance(self.layers, tuple) and len(self.layers) > 0 and len(set(self.layers)) == len(self.layers)
             and all(isinstance(i, int) and 0 <= i < num_hidden_layers for i in self.layers), "layers",
             f"a list of distinct layer ids in [0, num_hidden_layers={num_hidden_layers})")
        for f, low in (("max_ngram", 2), ("heads", 1), ("head_dim", 1), ("table_size", 2), ("conv_kernel", 1)):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, f, f"an integer >= {low}")
        need(self.table_size < 2**30, "table_size", "below 2**30 (rows are addressed with int32)")
        need(self.form in ENGRAM_FORMS, "form", " or ".join(ENGRAM_FORMS))
        need(self.tokenizer in ENGRAM_TOKENIZERS, "tokenizer", ", ".join(ENGRAM_TOKENIZERS))
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed",
             "an integer >= 0")


# config.json keys of the Engram fields (V4.1's names where it has the field)
_ENGRAM_KEYS = {"layers": "engram_layer_ids", "max_ngram": "engram_max_ngram_size", "heads": "engram_n_heads",
                "head_dim": "engram_head_dim", "table_size": "engram_vocab_size", "form": "engram_form",
                "conv_kernel": "engram_conv_kernel", "tokenizer": "engram_tokenizer", "seed": "engram_seed"}


def _engram(raw) -> EngramConfig | None:
    if raw is None or isinstance(raw, EngramConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"model.engram must be a mapping of Engram settings, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(EngramConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown model.engram field(s) {unknown}; known: {sorted(fields)}")
    raw = dict(raw)
    if isinstance(raw.get("layers"), (list, tuple)):
        raw["layers"] = tuple(raw["layers"])
    return EngramConfig(**raw)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field of the released config.json, under the release's names where it has one.

    Shapes in the code use: d = hidden_size, h = num_attention_heads, c = head_dim,
    E = n_routed_experts, K = num_experts_per_tok, I = moe_intermediate_size, n = hc_mult.
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    mtp_layer_type: str = SWA
    compress_rates: tuple[tuple[str, int], ...] = ((CSA, 4), (HCA, 128))
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling | None = None  # absent: no YaRN, as in the official ModelArgs and transformers
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    engram: EngramConfig | None = None

    def __post_init__(self):
        # Accept the friendly spellings in the constructor too (short kind names, a rates mapping,
        # a rope_scaling mapping), then validate.
        _check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, _FIELD_KINDS)
        set_ = functools.partial(object.__setattr__, self)
        if isinstance(self.layer_types, (list, tuple)):
            set_("layer_types", tuple(_SHORT_TYPES.get(str(t).lower(), t) for t in self.layer_types))
        set_("mtp_layer_type", _SHORT_TYPES.get(str(self.mtp_layer_type).lower(), self.mtp_layer_type))
        if isinstance(self.compress_rates, dict):
            set_("compress_rates", _normalise({"compress_rates": self.compress_rates})["compress_rates"])
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", _yarn(self.rope_scaling))
        set_("engram", _engram(self.engram))
        _validate(self)

    # ----- derived quantities -----
    @property
    def ratio(self) -> dict[str, int]:
        """Compression ratio per attention kind (0 for sliding-window-only layers)."""
        return {SWA: 0, **dict(self.compress_rates)}

    def layer_ratio(self, layer: int) -> int:
        """Compression ratio m of main layer ``layer``, or of the MTP layer when layer == L."""
        return self.ratio[self.layer_type(layer)]

    def layer_type(self, layer: int) -> str:
        return self.mtp_layer_type if layer == self.num_hidden_layers else self.layer_types[layer]

    @property
    def hc_mix_dim(self) -> int:
        """Rows of an mHC projection: pre (n) + post (n) + comb (n*n)."""
        return (2 + self.hc_mult) * self.hc_mult

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ----- conversions -----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read either config.json style (see the module docstring) or our YAML ``model:`` section."""
        return cls(**_normalise(dict(raw)))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """The ``model:`` section of a YAML config file (``configs/*.yaml``)."""
        raw = load_yaml(path)["model"]
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_release_dict(self) -> dict[str, Any]:
        """The release's config.json style (``compress_ratios`` with the MTP entry last).

        That style tells CSA from HCA by the ratio alone (4 is CSA), so it cannot hold every config.
        """
        rates = dict(self.compress_rates)
        if rates[CSA] != 4 or rates[HCA] == 4:
            raise ConfigError(f"compress_rates={rates} cannot be written in the release's config.json style, "
                              "which reads ratio 4 as CSA and any other ratio as HCA: use the HF style")
        out = self._common_dict()
        ratios = [self.ratio[t] for t in self.layer_types]
        ratios += [self.ratio[self.mtp_layer_type]] * self.num_nextn_predict_layers
        out.update(
            compress_ratios=ratios,
            num_hash_layers=self.num_hash_layers,
            qk_rope_head_dim=self.qk_rope_head_dim,
            rope_theta=self.rope_theta,
            compress_rope_theta=self.compress_rope_theta,
            rope_scaling=None
            if self.rope_scaling is None
            else {"type": "yarn", **dataclasses.asdict(self.rope_scaling)},
        )
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``transformers`` DeepseekV4Config style."""
        out = self._common_dict()
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta}
        if self.rope_scaling is not None:
            compress = {
                "rope_type": "yarn",
                "rope_theta": self.compress_rope_theta,
                **dataclasses.asdict(self.rope_scaling),
                "attention_factor": 1.0,
            }
        rotary = self.qk_rope_head_dim / self.head_dim
        main = {"rope_type": "default", "rope_theta": self.rope_theta}
        out.update(
            layer_types=list(self.layer_types),
            compress_rates=dict(self.compress_rates),
            mlp_layer_types=["hash_moe"] * self.num_hash_layers
            + ["moe"] * (self.num_hidden_layers - self.num_hash_layers),
            partial_rotary_factor=rotary,
            rope_parameters={
                "main": {**main, "partial_rotary_factor": rotary},
                "compress": {**compress, "partial_rotary_factor": rotary},
            },
        )
        if self.mtp_layer_type != SWA:  # transformers has no MTP block; keep ours for the round trip
            out["mtp_layer_type"] = self.mtp_layer_type
        return out

    def _common_dict(self) -> dict[str, Any]:
        skip = {"layer_types", "mtp_layer_type", "compress_rates", "rope_scaling", "num_hash_layers",
                "qk_rope_head_dim", "rope_theta", "compress_rope_theta", "engram"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4")
        if self.engram is not None:
            out.update({key: (list(getattr(self.engram, f)) if f == "layers" else getattr(self.engram, f))
                        for f, key in _ENGRAM_KEYS.items()})
        return out


_FIELD_KINDS = {f.name: f.type for f in dataclasses.fields(ModelConfig)}  # "int", "float", ... (string annotations)


# --------------------------------------------------------------------------------------------------
# Reading the two styles

_IGNORED_KEYS = {
    # Present in released or HF config.json files, with no effect on the math here.
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "quantization_config", "expert_dtype", "topk_method", "hidden_act", "attention_bias",
    "attention_dropout", "mlp_bias", "pad_token_id", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "auto_map", "partial_rotary_factor", "_name_or_path", "name_or_path",
    "num_local_experts", "intermediate_size",
}


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Map any accepted style onto ModelConfig's fields; unknown keys are an error."""
    _check_types(raw, _FIELD_KINDS)  # before the arithmetic below uses num_hidden_layers or head_dim
    out: dict[str, Any] = {}
    n_layers = raw.get("num_hidden_layers", ModelConfig.num_hidden_layers)
    mtp = raw.get("num_nextn_predict_layers", ModelConfig.num_nextn_predict_layers)

    # Attention kinds and compression ratios.
    if "compress_ratios" in raw:
        out.update(_from_compress_ratios(raw.pop("compress_ratios"), n_layers, mtp))
        raw.pop("compress_rates", None)
    if "layer_types" in raw:
        types = raw.pop("layer_types")
        if not isinstance(types, (list, tuple)):
            raise ConfigError(f"layer_types must be a list, got {types!r}")
        out["layer_types"] = tuple(_SHORT_TYPES.get(str(t).lower(), t) for t in types)
    if "compress_rates" in raw:
        rates = raw.pop("compress_rates")
        if not isinstance(rates, dict):
            raise ConfigError(f"compress_rates must be a mapping like {{csa: 4, hca: 128}}, got {rates!r}")
        merged = dict(ModelConfig.compress_rates)
        for k, v in rates.items():
            kind = _SHORT_TYPES.get(str(k).lower(), k)
            if kind not in (CSA, HCA):
                raise ConfigError(f"compress_rates key {k!r} must be one of csa, hca (or {CSA}, {HCA})")
            merged[kind] = v
        out["compress_rates"] = tuple(merged.items())
    for legacy, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if legacy in raw:
            rates = dict(out.get("compress_rates", ModelConfig.compress_rates))
            rates[kind] = raw.pop(legacy)
            out["compress_rates"] = tuple(rates.items())
    if "mtp_layer_type" in raw:
        t = raw.pop("mtp_layer_type")
        out["mtp_layer_type"] = _SHORT_TYPES.get(str(t).lower(), t)

    # Hash-routed layers.
    if "mlp_layer_types" in raw:
        kinds = raw.pop("mlp_layer_types")
        if not isinstance(kinds, (list, tuple)):
            raise ConfigError(f"mlp_layer_types must be a list of 'hash_moe' and 'moe' entries, got {kinds!r}")
        kinds = list(kinds)
        n_hash = sum(k == "hash_moe" for k in kinds)
        if kinds != ["hash_moe"] * n_hash + ["moe"] * (len(kinds) - n_hash):
            raise ConfigError(
                f"mlp_layer_types must be some 'hash_moe' entries followed by 'moe' entries, got {kinds}"
            )
        out["num_hash_layers"] = n_hash
    rotary = raw.pop("partial_rotary_factor", None)
    if rotary is not None and "qk_rope_head_dim" not in raw:  # HF style; the release's key wins
        if not _is("float", rotary) or not 0 < rotary <= 1:
            raise ConfigError(f"partial_rotary_factor={rotary!r} is not allowed: a number in (0, 1]")
        head_dim = raw.get("head_dim", ModelConfig.head_dim)
        out["qk_rope_head_dim"] = int(round(head_dim * rotary))

    # RoPE: the release's flat keys, or HF's rope_parameters {main, compress}.
    if "rope_parameters" in raw and raw["rope_parameters"]:
        rp = raw.pop("rope_parameters")
        if not isinstance(rp, dict) or not all(isinstance(rp.get(k, {}), dict) for k in ("main", "compress")):
            raise ConfigError(f"rope_parameters must be a mapping with 'main' and 'compress' mappings, got {rp!r}")
        raw.pop("rope_theta", None)  # transformers also writes stale top-level copies; it reads these
        raw.pop("compress_rope_theta", None)
        main, comp = rp.get("main", {}), rp.get("compress", {})
        for part, key, name in ((main, "main", "rope_theta"), (comp, "compress", "compress_rope_theta")):
            if "rope_theta" in part:
                _check_types({f"rope_parameters.{key}.rope_theta": part["rope_theta"]},
                             {f"rope_parameters.{key}.rope_theta": "float"})
                out[name] = float(part["rope_theta"])
        yarn = comp.get("rope_type", comp.get("type")) == "yarn"
        if yarn and comp.get("attention_factor") != 1.0:
            factor = comp.get("attention_factor")
            raise ConfigError(
                f"rope_parameters.compress.attention_factor is {factor!r}: transformers scales the compressed "
                f"layers' cos/sin by it ({'when absent, by 0.1*ln(factor)+1' if factor is None else 'as given'}), "
                "which DeepSeek-V4's own code does not do. v4jax follows the release (YaRN without an attention "
                "temperature) and so takes only attention_factor: 1.0; set that to load the release's numbers")
        out["rope_scaling"] = _yarn(comp) if yarn else None
    raw.pop("rope_parameters", None)
    if "rope_scaling" in raw:
        rs = raw.pop("rope_scaling")
        out["rope_scaling"] = None if not rs else (rs if isinstance(rs, YarnScaling) else _yarn(rs))

    engram = {f: raw.pop(key) for f, key in _ENGRAM_KEYS.items() if key in raw}
    if "engram" in raw or engram:
        out["engram"] = _engram({**(raw.pop("engram", None) or {}), **engram})

    for key, value in raw.items():
        if key in _IGNORED_KEYS:
            continue
        if key not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ConfigError(f"unknown model config field {key!r}")
        out[key] = value
    if "layer_types" in out:
        out["layer_types"] = tuple(out["layer_types"])
    if isinstance(out.get("eos_token_id"), list) and out["eos_token_id"]:  # transformers may list several
        out["eos_token_id"] = out["eos_token_id"][0]
    return out


def _from_compress_ratios(ratios, n_layers: int, mtp: int) -> dict[str, Any]:
    """Release style: ratio 0 is sliding-window only, 4 is CSA, any other positive ratio is HCA."""
    if not isinstance(ratios, (list, tuple)) or len(ratios) not in (n_layers, n_layers + mtp):
        raise ConfigError(
            f"compress_ratios must list one ratio per layer ({n_layers}) plus one per MTP layer "
            f"({mtp}), got {ratios!r}"
        )
    hca = {r for r in ratios if r not in (0, 4)}
    if any((not isinstance(r, int)) or r < 0 for r in ratios) or len(hca) > 1:
        raise ConfigError(
            f"compress_ratios entries must be 0 (sliding window), 4 (CSA) or one HCA ratio, got {ratios}"
        )
    kind = lambda r: SWA if r == 0 else CSA if r == 4 else HCA  # noqa: E731
    out = {
        "layer_types": tuple(kind(r) for r in ratios[:n_layers]),
        "compress_rates": ((CSA, 4), (HCA, hca.pop() if hca else 128)),
    }
    if len(ratios) > n_layers:
        out["mtp_layer_type"] = kind(ratios[n_layers])
    return out


_YARN_KINDS = {f.name: f.type for f in dataclasses.fields(YarnScaling)}


def _yarn(d: dict[str, Any]) -> YarnScaling:
    if not isinstance(d, dict):
        raise ConfigError(f"rope_scaling={d!r} is not allowed: a mapping like {{type: yarn, factor: 16, "
                          "original_max_position_embeddings: 65536}, or null for no YaRN")
    kind = d.get("type", d.get("rope_type", "yarn"))
    if kind != "yarn":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported: DeepSeek-V4 uses yarn (or null for none)")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in d:
            raise ConfigError(f"rope_scaling (yarn) needs the field {key!r}")
    values = {k: d[k] for k in _YARN_KINDS if k in d}
    _check_types(values, _YARN_KINDS, "rope_scaling.")
    return YarnScaling(**{k: (float(v) if _YARN_KINDS[k] == "float" else v) for k, v in values.items()})


# --------------------------------------------------------------------------------------------------
# Validation


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, field: str, allowed: str):
        if not ok:
            raise ConfigError(f"{field}={getattr(c, field, None)!r} is not allowed: {allowed}")

    for f in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "q_lora_rank",
              "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim",
              "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings"):
        v = getattr(c, f)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "a positive integer")
    need(isinstance(c.num_hidden_layers, int) and c.num_hidden_layers >= 0, "num_hidden_layers",
         "an integer >= 0")
    need(c.num_key_value_heads == 1, "num_key_value_heads", "1 (DeepSeek-V4 shares one K=V head)")
    need(c.n_shared_experts == 1, "n_shared_experts", "1 (as in the release)")
    need(c.qk_rope_head_dim % 2 == 0 and 0 < c.qk_rope_head_dim <= c.head_dim, "qk_rope_head_dim",
         f"an even number in (0, head_dim={c.head_dim}]")
    need(c.qk_rope_head_dim <= c.index_head_dim, "qk_rope_head_dim",
         f"at most index_head_dim={c.index_head_dim} (the indexer rotates its last rope dims too)")
    need(c.num_attention_heads % c.o_groups == 0, "o_groups",
         f"a divisor of num_attention_heads={c.num_attention_heads}")
    need(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
         f"at most n_routed_experts={c.n_routed_experts}")
    need(c.scoring_func == "sqrtsoftplus", "scoring_func", "'sqrtsoftplus' (the release's router)")
    need(c.norm_topk_prob is True, "norm_topk_prob", "true (the release normalises top-k weights)")
    need(0 <= c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers",
         f"between 0 and num_hidden_layers={c.num_hidden_layers}")
    need(c.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "0 or 1 (MTP depth 1)")
    need(c.tie_word_embeddings is False, "tie_word_embeddings", "false (V4's head is untied)")
    need(c.swiglu_limit > 0, "swiglu_limit", "a positive number")
    need(c.routed_scaling_factor > 0, "routed_scaling_factor", "a positive number")
    need(c.rms_norm_eps > 0 and c.hc_eps >= 0, "rms_norm_eps", "rms_norm_eps > 0 and hc_eps >= 0")
    need(c.rope_theta > 1 and c.compress_rope_theta > 1, "rope_theta",
         "rope_theta and compress_rope_theta both > 1")
    need(isinstance(c.layer_types, tuple) and len(c.layer_types) == c.num_hidden_layers,
         "layer_types", f"a list of {c.num_hidden_layers} entries (one per layer), or compress_ratios")
    bad = [t for t in c.layer_types if t not in LAYER_TYPES]
    need(not bad, "layer_types", f"entries from {LAYER_TYPES} (or swa/csa/hca), not {bad}")
    need(c.mtp_layer_type in LAYER_TYPES, "mtp_layer_type", f"one of {LAYER_TYPES}")
    rates = dict(c.compress_rates)
    need(set(rates) == {CSA, HCA} and all(isinstance(v, int) and v >= 1 for v in rates.values()),
         "compress_rates", "positive integer ratios for both csa and hca")
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        need(rs.factor >= 1 and rs.original_max_position_embeddings > 0 and rs.beta_fast > rs.beta_slow > 0,
             "rope_scaling", "yarn with factor >= 1, original_max_position_embeddings > 0, "
             "beta_fast > beta_slow > 0")
    if not math.isfinite(c.initializer_range) or c.initializer_range <= 0:
        need(False, "initializer_range", "a positive number")
    if c.engram is not None:
        c.engram.validate(c.num_hidden_layers)


# --------------------------------------------------------------------------------------------------
# YAML files under configs/


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` and ``5E3`` are numbers.

    YAML 1.1 (what PyYAML implements) wants a dot in a float's mantissa, so it reads ``1e-4`` as the
    string "1e-4"; users write learning rates that way, in files and in ``key=value`` overrides."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, reading ``1e-4`` as a float (see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file: a mapping with a ``model:`` section (and later ``train:``)."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{path} must be a mapping with a 'model:' section")
    return data


def model_config_from_yaml(path: str | Path) -> ModelConfig:
    return ModelConfig.from_yaml(path)
