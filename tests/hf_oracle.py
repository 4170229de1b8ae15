"""The independent reference: ``transformers``' DeepSeek-V4 in PyTorch on CPU, fp32.

``make_reference(config, seed, dir)`` builds a randomly initialised ``DeepseekV4ForCausalLM`` from our
config (through its HF-style config.json), fills every tensor with random values (also the ones the
port initialises to zero or one: sinks, position biases, router biases, mHC base/scale, tid2eid), and
writes it with ``save_pretrained``: exactly what a user would hand to ``v4jax.from_pretrained``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from v4jax.config import ModelConfig


def hf_config(config: ModelConfig) -> DeepseekV4Config:
    hf = DeepseekV4Config(**config.to_hf_dict())
    hf._attn_implementation = "eager"
    return hf


@torch.no_grad()
def randomise(model: DeepseekV4ForCausalLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    cfg = model.config
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            rows = torch.rand((t.shape[0], cfg.n_routed_experts), generator=g).argsort(dim=1)
            t.copy_(rows[:, : t.shape[1]])
        elif "inv_freq" in name:
            continue  # RoPE tables, derived from the config
        elif "norm" in name and t.ndim == 1:
            t.copy_(randn(t.shape, 0.1, 1.0))
        elif leaf == "scale" or leaf == "hc_scale":
            t.copy_(randn(t.shape, 0.3, 0.8))
        elif leaf in ("base", "hc_base"):
            t.copy_(randn(t.shape, 0.5))
        elif leaf in ("sinks", "position_bias"):
            t.copy_(randn(t.shape, 1.0))
        elif leaf == "e_score_correction_bias":
            t.copy_(randn(t.shape, 0.1))
        elif "embed_tokens" in name:
            t.copy_(randn(t.shape, 1.0))
        elif t.is_floating_point() and t.ndim >= 2:
            t.copy_(randn(t.shape, 1.0 / math.sqrt(t.shape[-1])))
        elif t.is_floating_point():
            raise AssertionError(f"no random rule for {name}")


def make_reference(config: ModelConfig, seed: int, directory) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config(config)).float().eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    return model


@torch.no_grad()
def reference_logits(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@torch.no_grad()
def indexer_scores(model: DeepseekV4ForCausalLM, tokens: np.ndarray) -> list[np.ndarray]:
    """The reference's lightning-indexer scores [b, s, n] of each CSA layer, for tie checks."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.numpy().copy()))
             for name, m in model.named_modules() if name.endswith("indexer.scorer")]
    try:
        reference_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


def assert_no_topk_ties(scores: list[np.ndarray], k: int, m: int) -> None:
    """Top-k order among equal scores is unspecified in both frameworks, so a parity case must not
    depend on it: for every query, the k-th and (k+1)-th best visible scores must differ."""
    for layer_scores in scores:
        b, s, n = layer_scores.shape
        for t in range(s):
            visible = (t + 1) // m
            if visible <= k:
                continue
            row = np.sort(layer_scores[:, t, :visible], axis=-1)[:, ::-1]
            gap = row[:, k - 1] - row[:, k]
            assert (gap > 1e-6 * np.abs(row[:, k - 1]).clip(1e-30)).all(), f"top-k tie at query {t}: {row}"


@torch.no_grad()
def layer_inputs(model: DeepseekV4ForCausalLM, tokens) -> dict:
    """The keyword arguments every reference decoder layer takes, for one [b, s] token batch."""
    from transformers.masking_utils import create_sliding_window_causal_mask  # noqa: PLC0415

    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    emb = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    mask = create_sliding_window_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=None,
                                             cache=None, position_ids=pos)
    rope = {k: model.model.rotary_emb(emb, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    return dict(position_embeddings=rope, position_ids=pos, attention_mask=mask, input_ids=ids)


@torch.no_grad()
def run_layers(model: DeepseekV4ForCausalLM, tokens, layers, streams=None, input_ids=None) -> torch.Tensor:
    """Run the given reference decoder layers on ``streams`` [b, s, n, d] (default: the embedded tokens)."""
    kw = layer_inputs(model, tokens)
    if input_ids is not None:
        kw["input_ids"] = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if streams is None:
        emb = model.model.embed_tokens(kw["input_ids"])
        streams = emb[:, :, None, :].expand(-1, -1, model.config.hc_mult, -1).contiguous()
    for layer in layers:
        streams = layer(streams, **kw)
    return streams
