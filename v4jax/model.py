"""The DeepSeek-V4 model: ``forward`` over a parameter pytree, and the modules that declare it
(spec §2.1, §2.2, §2.8).

The parameters are declared by the NNX modules at the end of this file (and of mhc, attention and
moe); ``forward`` and the rest take their pure tree (``v4jax.params.pure``): nested dicts of arrays.
Matrices keep the checkpoint's [out, in] layout and the official names, so conversion is a rename.
The tree (L main layers; ``mtp`` only when ``num_nextn_predict_layers == 1``)::

    embed [V, d], head [V, d], norm [d], hc_head {fn [n, n*d], base [n], scale [1]}
    layers[i]: attn_norm [d], ffn_norm [d], hc_attn/hc_ffn {fn [(2+n)n, n*d], base, scale [3]},
        attn {wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink,
              compressor {wkv, wgate, ape, norm}                     (CSA and HCA layers),
              indexer {wq_b, weights_proj, compressor {...}}}        (CSA layers),
        ffn {gate {weight [E, d], bias [E] | tid2eid [V, K]},
             experts {w1 [E, I, d], w3 [E, I, d], w2 [E, d, I]}, shared_experts {w1, w3, w2}}
    mtp: one more block (the keys above) plus e_proj, h_proj [d, d], enorm, hnorm, norm [d], hc_head

Training uses the scan layout instead, where ``stages`` replaces ``layers`` (see v4jax.scan).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import context
from v4jax.attention import Attention, attention
from v4jax.config import ModelConfig
from v4jax.engram import Engram, engram
from v4jax.layers import linear, linear_f32, rms_norm
from v4jax.mhc import HyperConnection, hc_head, hc_post, hc_pre_normed
from v4jax.moe import MoE, moe
from v4jax.parallel import REMAT_POLICIES, constrain_tokens
from v4jax.params import ADAMW, Init, ParamInfo, declarations, declare, matrix, path_keys, pure, vector
from v4jax.quant import block_scaled_spec
from v4jax.scan import run_stages, stack_layers

# --------------------------------------------------------------------------------------------------
# Forward


def block(x, p, config: ModelConfig, layer: int, positions, segment_ids, token_ids, sparse=True, with_aux=False,
          parallel=None, mesh=None, engram_ids=None, attend=None, mhc_kernel=False):
    """One decoder block on the streams x [b, s, n, d]: Engram (in its layers) adds to the streams,
    then mHC around attention, then around the MoE. ``engram_ids`` [b, s, j]: this layer's rows.
    ``attend(h, p_attn) -> (out, aux)`` replaces the attention (``v4jax.decode`` runs it on a cache).
    ``mhc_kernel``: the streams' collapses in ``v4jax.mhc_kernel`` (decoding; no gradient).

    Returns (x, info): info holds the routing (``idx``, ``scores``) and, with ``with_aux``, the
    attention's aux dict under ``attn`` (see ``v4jax.attention.attention``).
    """
    if "engram" in p:
        x = x + engram(x, p["engram"], engram_ids, config.engram, config.rms_norm_eps)
    hc = dict(sinkhorn_iters=config.hc_sinkhorn_iters, hc_eps=config.hc_eps, norm_eps=config.rms_norm_eps,
              kernel=mhc_kernel)
    h, post, comb = hc_pre_normed(x, p["hc_attn"], p["attn_norm"], **hc)
    if attend is None:
        a, attn_aux = attention(h, p["attn"], config, layer, positions, segment_ids, sparse, with_aux, parallel, mesh)
    else:
        a, attn_aux = attend(h, p["attn"])
    x = hc_post(a, x, post, comb)
    h, post, comb = hc_pre_normed(x, p["hc_ffn"], p["ffn_norm"], **hc)
    f, info = moe(h, p["ffn"], token_ids, config, parallel, mesh)
    if with_aux:
        info["attn"] = attn_aux
    return hc_post(f, x, post, comb), info


def layer_fn(config: ModelConfig, layer: int, positions, segment_ids, token_ids, sparse, with_aux, parallel,
             mesh, layer_stats=None, in_scan=False, engram_ids=None):
    """``f(x, p) -> (x, info)``: ``block`` for one layer (info reduced by ``layer_stats(info, layer)``
    when given), wrapped in jax.checkpoint with the configured remat policy. Inside a loop (a scanned
    stage), CSE prevention is left off (the loop already stops it). ``engram_ids`` [b, s, Engram layers, j]:
    every Engram layer's rows (this layer takes its own)."""
    ids = None
    if config.engram is not None and layer in config.engram.layers:
        ids = engram_ids[:, :, config.engram.layers.index(layer)]

    def fn(x, p):
        x = constrain_tokens(x, mesh)
        x, info = block(x, p, config, layer, positions, segment_ids, token_ids, sparse, with_aux, parallel, mesh,
                        ids)
        return x, (info if layer_stats is None else layer_stats(info, layer))

    if parallel is None or parallel.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[parallel.remat], prevent_cse=not in_scan)


def _default_layout(tokens):
    b, s = tokens.shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), jnp.zeros((b, s), jnp.int32)


def final_hidden(x, p_hc, norm_w, config: ModelConfig):
    """Streams [b, s, n, d] -> the head's input [b, s, d]: hc_head collapse, then the final norm."""
    y = hc_head(x, p_hc, hc_eps=config.hc_eps, norm_eps=config.rms_norm_eps)
    return rms_norm(y, norm_w, config.rms_norm_eps)


def forward(params, tokens, config: ModelConfig, *, positions=None, segment_ids=None, dtype=jnp.float32,
            sparse=True, mtp=False, with_aux=False, parallel=None, mesh=None, layer_stats=None, logits=True,
            engram_ids=None):
    """Run the model. tokens [b, s] int -> dict with ``logits`` [b, s, V] fp32 and ``routing``.

    With ``logits=False`` the result has the head's input ``hidden`` [b, s, d] (and ``mtp_hidden``)
    instead of logits, for a loss that applies the head in chunks (``v4jax.losses.token_nll``) or a
    prefill that needs only the last position.

    positions/segment_ids [b, s]: per-document positions and document ids for packed rows (default:
    one document per row). With ``mtp=True`` the result also has ``mtp_logits`` [b, s, V]: position
    t combines the main streams at t with token t+1 and predicts token t+2 (the last position sees
    a padding token 0 and is meaningless). ``sparse=False`` is the dense attention stage (CSA
    queries use every visible entry); ``with_aux`` adds each layer's attention aux to ``routing``.
    ``parallel`` (a ``v4jax.parallel.ParallelConfig``) picks the MoE backend and the remat policy;
    ``mesh`` turns on expert and context parallelism and the rows-and-tokens sharding constraints at block boundaries.
    ``layer_stats(info, layer)``, when given, replaces each layer's info inside the layer (inside the
    scan), so only what it returns is kept (the trainer keeps loss terms and expert loads).
    ``engram_ids`` [b, s, Engram layers, j] int32: the rows Engram reads, from
    ``v4jax.engram.Hasher(config)(tokens, segment_ids)`` on the host (the input pipeline adds them
    to each batch); required when the config has Engram.
    """
    chex.assert_rank(tokens, 2)
    if config.engram is not None and engram_ids is None:
        raise ValueError("this config has Engram: pass engram_ids = v4jax.engram.Hasher(config)(tokens, "
                         "segment_ids), computed on the host (the input pipeline adds them to each batch)")
    if positions is None or segment_ids is None:
        default_pos, default_seg = _default_layout(tokens)
        positions = default_pos if positions is None else positions
        segment_ids = default_seg if segment_ids is None else segment_ids
    chex.assert_equal_shape([tokens, positions, segment_ids])
    n = config.hc_mult
    e = params["embed"][tokens].astype(dtype)  # [b, s, d]
    x = jnp.broadcast_to(e[:, :, None, :], e.shape[:2] + (n, e.shape[-1]))  # n identical streams

    def make(layer, in_scan=False):
        return layer_fn(config, layer, positions, segment_ids, tokens, sparse, with_aux, parallel, mesh, layer_stats,
                        in_scan, engram_ids)

    if "stages" in params:  # the scan layout (v4jax.scan)
        x, routing = run_stages(x, params["stages"], config, make,
                                parallel.unroll_stages if parallel is not None else 0)
    else:
        routing = []
        for i, p in enumerate(params["layers"]):
            x, info = make(i)(x, p)
            routing.append(info)
    x = constrain_tokens(x, mesh)
    out = {"routing": routing}
    hidden = {"": final_hidden(x, params["hc_head"], params["norm"], config)}
    if mtp:
        hidden["mtp_"], out["mtp_routing"] = mtp_forward(
            params, x, tokens, config, positions, segment_ids, dtype, sparse, with_aux, parallel, mesh, layer_stats)
    for prefix, y in hidden.items():
        if logits:
            out[prefix + "logits"] = linear_f32(y, params["head"])
        else:
            out[prefix + "hidden"] = y
    return out


def mtp_forward(params, x_main, tokens, config: ModelConfig, positions, segment_ids, dtype, sparse=True,
                with_aux=False, parallel=None, mesh=None, layer_stats=None):
    """The depth-1 MTP block on the main model's final streams x_main [b, s, n, d] (before hc_head).
    Returns the MTP head's input [b, s, d] and the block's routing info."""
    p = params["mtp"]
    nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # position t carries token t+1
    e = params["embed"][nxt]
    if context.ways(mesh) > 1 and nxt.shape[1] % context.ways(mesh) == 0:
        # split like the streams: left to XLA, the shifted row's embedding was whole on every device
        # (a 1M row on each chip). Only then: with the tokens not split, XLA:CPU's partitioner
        # miscompiled this constraint on a table split over context (an HLO verifier error).
        e = constrain_tokens(e.astype(dtype), mesh)
    x = mtp_input(p, e, x_main, config, dtype)
    x, info = layer_fn(config, config.num_hidden_layers, positions, segment_ids, nxt, sparse, with_aux, parallel,
                       mesh, layer_stats)(x, p)
    return final_hidden(x, p["hc_head"], p["norm"], config), info


def mtp_input(p, embedded, x_main, config: ModelConfig, dtype):
    """The MTP block's input streams [b, s, n, d] at position t: e_proj(enorm(the embedding of token
    t+1, ``embedded`` [b, s, d])) added to every stream of h_proj(hnorm(x_main [b, s, n, d], the main
    model's final streams at t)). ``p``: params["mtp"]."""
    eps = config.rms_norm_eps
    e = rms_norm(embedded.astype(dtype), p["enorm"], eps)
    h = rms_norm(x_main, p["hnorm"], eps)  # per stream, over d
    return (linear(e, p["e_proj"])[:, :, None, :] + linear(h, p["h_proj"])).astype(dtype)


# --------------------------------------------------------------------------------------------------
# The modules: parameters with their declarations (v4jax.params), named as in the release


class Block(nnx.Module):
    """One decoder block: mHC around the attention and around the MoE, with their norms. Calling it
    runs ``block`` on its parameters."""

    def __init__(self, config: ModelConfig, layer: int, init: Init):
        d = config.hidden_size
        self.config, self.layer = config, layer
        self.hc_attn = HyperConnection(config, init)
        self.hc_ffn = HyperConnection(config, init)
        self.attn_norm = declare(init, vector((d,), ("embed",)))
        self.ffn_norm = declare(init, vector((d,), ("embed",)))
        self.attn = Attention(config, layer, init)
        self.ffn = MoE(config, layer, init)
        if config.engram is not None and layer in config.engram.layers:
            self.engram = Engram(config, init)

    def __call__(self, x, positions, segment_ids, token_ids, **kw):
        return block(x, pure(self), self.config, self.layer, positions, segment_ids, token_ids, **kw)


class MTPBlock(Block):
    """The depth-1 MTP block (``mtp.0.*``): a block of type ``config.mtp_layer_type`` plus the
    projections that combine the main streams with the next token's embedding, and its own head
    norm and collapse (it shares the main model's embedding and head)."""

    def __init__(self, config: ModelConfig, init: Init):
        super().__init__(config, config.num_hidden_layers, init)
        d = config.hidden_size
        self.e_proj = declare(init, matrix((d, d), (None, "embed"), export="fp8"))
        self.h_proj = declare(init, matrix((d, d), (None, "embed"), export="fp8"))
        for name in ("enorm", "hnorm", "norm"):
            setattr(self, name, declare(init, vector((d,), ("embed",))))
        self.hc_head = HyperConnection(config, init, head=True)


class Transformer(nnx.Module):
    """The whole model, for the functional API (``forward`` on ``pure(model)``) or called directly.

    ``Transformer(config, nnx.Rngs(seed), dtype)`` draws a random model: matrices ~ N(0,
    initializer_range), norm weights 1, sinks, compressor position biases and router biases 0, mHC
    base 0 and scale 0.01 (spec C.4: every stream mix starts near uniform, the residual path
    dominates), and for hash layers K distinct experts per token id (the release's hash is not
    published). fp32-kept tensors are fp32 whatever ``dtype``. ``rngs=None`` gives an abstract model
    (``jax.ShapeDtypeStruct`` values).
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None, dtype=jnp.float32):
        init = Init(rngs, dtype, config.initializer_range, config.n_routed_experts)
        v, d = config.vocab_size, config.hidden_size
        self.config = config
        self.embed = declare(init, ParamInfo((v, d), "normal", "param", ("vocab", "embed"), ADAMW))
        self.layers = nnx.List([Block(config, i, init) for i in range(config.num_hidden_layers)])
        self.hc_head = HyperConnection(config, init, head=True)
        self.norm = declare(init, vector((d,), ("embed",)))
        self.head = declare(init, ParamInfo((v, d), "normal", "param", ("vocab", "embed"), ADAMW))
        if config.num_nextn_predict_layers:
            self.mtp = MTPBlock(config, init)

    def __call__(self, tokens, **kw):
        return forward(pure(self), tokens, self.config, **kw)


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32, scan: bool = False) -> dict:
    """A random model's parameter tree (see ``Transformer``), deterministic in ``seed``; ``scan``:
    in the scan layout (``v4jax.scan``), which holds the same values."""
    params = pure(Transformer(config, nnx.Rngs(seed), dtype))
    return stack_layers(params, config) if scan else params


def param_specs(config: ModelConfig, dtype=jnp.float32, scan: bool = False) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves (no memory allocated); ``scan``: in the scan
    layout (``v4jax.scan``)."""
    specs = pure(Transformer(config, None, dtype))
    return stack_layers(specs, config) if scan else specs


def stored_specs(config: ModelConfig, dtype=jnp.bfloat16, formats: dict | None = None) -> dict:
    """``param_specs`` with the weights kept quantised as ``v4jax.quant.BlockScaled`` specs.
    ``formats``: {parameter path: "fp8" or "fp4"}; by default the release's (spec §3.3): the routed
    experts in FP4, every other weight it stores in FP8 (declared ``export="fp8"``) in FP8."""
    model = Transformer(config, None, dtype)
    specs = pure(model)
    if formats is None:
        release = {"fp8": "fp8", "experts": "fp4"}
        formats = {path_keys(p): release[i.export] for p, i in
                   jax.tree_util.tree_flatten_with_path(declarations(model))[0] if i.export in release}

    def one(keypath, s):
        fmt = formats.get(path_keys(keypath))
        return s if fmt is None else block_scaled_spec(s.shape, fmt)

    return jax.tree_util.tree_map_with_path(one, specs)


def param_count(config: ModelConfig) -> dict[str, int]:
    """Parameter counts: ``total`` (with MTP), ``mtp``, ``engram_tables`` and ``active`` per token in
    the main model (embedding row excluded as the release counts it: embed and head included, K of E
    experts; of an Engram table, the rows a token reads)."""
    specs = param_specs(config)
    size = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))  # noqa: E731
    total = size(specs)
    mtp = size(specs.get("mtp", {}))
    experts = sum(size(layer["ffn"]["experts"]) for layer in specs["layers"])
    tables = sum(size(layer["engram"]["table"]) for layer in specs["layers"] if "engram" in layer)
    active = total - mtp - experts + experts * config.num_experts_per_tok // config.n_routed_experts - tables
    if config.engram is not None:
        e = config.engram
        active += len(e.layers) * (e.max_ngram - 1) * e.heads * e.head_dim
    return {"total": total, "mtp": mtp, "engram_tables": tables, "active": active}
