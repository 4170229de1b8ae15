"""The MTP block, checked against spec §2.8 written out in numpy around the reference's decoder layer.

transformers has no MTP block, so the test builds a reference with one extra (SWA, non-hash) decoder
layer, moves that layer's tensors to ``mtp.0.*`` of a checkpoint in the *release's* layout (with a
release-style config.json, sharded in two files with an index), adds random MTP-only tensors
(e_proj, h_proj, enorm, hnorm, norm, hc_head_*), and compares:

* the main logits with the reference's first L layers, hc_head, norm and head;
* the MTP logits with: e = RMSNorm(embed[t+1]; enorm), h = RMSNorm(streams; hnorm),
  X0 = e_proj(e) + h_proj(h) (e on every stream), X1 = reference decoder layer(X0),
  logits = head(RMSNorm(HcHead(X1); norm)).
"""

import json

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

import v4jax
from tests import hf_oracle
from tests.helpers import CONFIGS
from v4jax.convert.names import HF, to_official

TOLERANCE = 1e-5


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _build(tmp_path):
    config = CONFIGS["a"]
    L = config.num_hidden_layers
    ext = config.replace(num_hidden_layers=L + 1, layer_types=config.layer_types + ("swa",))
    reference = hf_oracle.make_reference(ext, seed=5, directory=tmp_path / "hf")

    tensors = {}
    for name, value in load_file(tmp_path / "hf" / "model.safetensors").items():
        name = to_official(name, HF)
        tensors[name.replace(f"layers.{L}.", "mtp.0.")] = value
    rng = np.random.default_rng(6)
    d, n = config.hidden_size, config.hc_mult
    extra = {"e_proj.weight": rng.normal(0, d**-0.5, (d, d)), "h_proj.weight": rng.normal(0, d**-0.5, (d, d)),
             "enorm.weight": rng.normal(1, 0.1, d), "hnorm.weight": rng.normal(1, 0.1, d),
             "norm.weight": rng.normal(1, 0.1, d), "hc_head_fn": rng.normal(0, 0.1, (n, n * d)),
             "hc_head_base": rng.normal(0, 0.5, n), "hc_head_scale": rng.normal(0.8, 0.3, 1)}
    tensors.update({f"mtp.0.{k}": v.astype(np.float32) for k, v in extra.items()})

    out = tmp_path / "official"
    out.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: np.ascontiguousarray(tensors[k]) for k in keys}, out / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config.to_release_dict()))
    return config, reference, tensors, out


def test_official_layout_and_mtp(tmp_path):
    config, reference, tensors, directory = _build(tmp_path)
    L, eps = config.num_hidden_layers, config.rms_norm_eps
    model = v4jax.from_pretrained(directory, dtype="float32")
    assert model.has_mtp and model.config == config

    tokens = np.random.default_rng(7).integers(0, config.vocab_size, size=(2, 29))
    layers = reference.model.layers
    streams = hf_oracle.run_layers(reference, tokens, layers[:L])
    with torch.no_grad():
        main = reference.lm_head(reference.model.norm(reference.model.hc_head(streams))).numpy()
    got = np.asarray(model.logits(tokens))
    assert np.abs(got - main).max() / np.abs(main).max() <= TOLERANCE

    t = {k[len("mtp.0."):]: v.astype(np.float64) for k, v in tensors.items() if k.startswith("mtp.0.")}
    nxt = np.concatenate([tokens[:, 1:], np.zeros((2, 1), tokens.dtype)], axis=1)
    e = _rms(tensors["embed.weight"].astype(np.float64)[nxt], t["enorm.weight"], eps)
    h = _rms(streams.numpy().astype(np.float64), t["hnorm.weight"], eps)
    x0 = (e @ t["e_proj.weight"].T)[:, :, None, :] + h @ t["h_proj.weight"].T
    x1 = hf_oracle.run_layers(reference, tokens, layers[L:], streams=torch.as_tensor(x0, dtype=torch.float32),
                              input_ids=nxt).numpy().astype(np.float64)
    flat = x1.reshape(x1.shape[:2] + (-1,))
    mix = flat @ t["hc_head_fn"].T / np.sqrt(np.mean(flat * flat, -1, keepdims=True) + eps)
    w = 1 / (1 + np.exp(-(mix * t["hc_head_scale"][0] + t["hc_head_base"]))) + config.hc_eps
    y = np.einsum("bsn,bsnd->bsd", w, x1)
    want = _rms(y, t["norm.weight"], eps) @ tensors["head.weight"].astype(np.float64).T

    got = np.asarray(model.mtp_logits(tokens))
    assert got.shape == (2, 28, config.vocab_size)
    err = np.abs(got - want[:, :-1]).max() / np.abs(want).max()
    print(f"MTP max relative logit error {err:.2e}")
    assert err <= TOLERANCE
