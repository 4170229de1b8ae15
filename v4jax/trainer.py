"""Training: config, learning-rate schedule, the jitted train step, and a FLOP estimate.

One step (spec §4)::

    loss = CE(main) + λ_mtp·CE(MTP, token t+2) + α·balance + w_I·KL(indexer)
    grads -> clip by global norm -> Muon/AdamW (v4jax.optim.v4_optimizer)
    router biases (not in the optimizer): b <- b + u·sign(mean load - load) from this step's routing

With ``train.grad_accum_steps`` = k the step runs k micro-batches in a scan and sums their fp32
gradients and loads before the optimizer, with every loss weighted as one batch of all their rows
(``update_gradients``).

A step whose loss or gradient norm is not finite changes nothing (the state stays as it was, only
its step count moves on) and is reported with ``ok = False``; train.py stops after
``max_bad_steps`` such steps in a row. A step whose loss and gradient are finite but whose new state
(params, optimizer state, biases) is not (a learning rate that overflows float32) is reported with
``ok = False`` and ``state_finite = False``: that state cannot be trained on or saved, and train.py
stops at once. It is not rolled back: keeping the old state until the new one is checked would keep
a second copy of the whole state alive in every step (2.1 GB more for small.yaml at batch 1 x 128 on
an H100; docs/benchmarks.md, Part 8).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from v4jax import context
from v4jax.checkpoint import Checkpointer, all_finite, model_config_from_meta, scan_layers_from_meta
from v4jax.config import ConfigError, ModelConfig, load_yaml, parse_yaml
from v4jax.data import DataConfig
from v4jax.losses import layer_routing_stats, routing_losses, update_router_bias, weighted_nll
from v4jax.model import forward, param_count, param_specs
from v4jax.optim import v4_optimizer
from v4jax.parallel import ParallelConfig, ShardingError, batch_shards, whole_rows
from v4jax.policy_losses import count_sequences
from v4jax.post_training import PostConfig
from v4jax.quant import PRECISIONS
from v4jax.scan import plan
from v4jax.schema import for_training, param_shardings, shard_like_params

SECTIONS = ("model", "train", "data", "parallel", "post")

F32 = jnp.float32
FLOAT32_MAX = float(jnp.finfo(F32).max)


def _finite_number(v) -> bool:
    """A number that stays finite in float32, where the step uses it (lr=1e39 would be inf there)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The ``train:`` section of a YAML config. Steps count optimizer updates."""

    steps: int = 300
    lr: float = 3e-3  # peak learning rate, shared by Muon and AdamW
    lr_min: float = 3e-4  # end of the cosine decay
    warmup_steps: int = 20  # linear warm-up from 0
    decay_start: int = 200  # constant until here, then cosine decay to lr_min at `steps`
    clip_norm: float = 1.0  # global gradient norm clip (0: off)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay fp32)
    # bf16: no quantisation (matmuls in `dtype`) | fp8: V4's FP8 block formats on the weights the
    # release stores in FP8 and on their inputs | fp8+fp4qat: the same, the routed experts in FP4
    # (quantisation-aware training); straight-through gradients, fp32 master weights (v4jax.quant)
    precision: str = "bf16"
    indexer_fp4: bool = False  # the indexer's queries and keys Hadamard-rotated and in FP4 (V4's QAT)
    attention: str = "sparse"  # sparse (indexer top-k) | dense (CSA uses all visible entries)
    mtp_weight: float = 0.3
    mtp_weight_after_decay: float = 0.1  # from decay_start on (spec §4)
    balance_weight: float = 1e-4
    bias_update_speed: float = 1e-3
    indexer_loss_weight: float = 1.0
    # micro-batches per optimizer update: data.batch_size rows are split into this many, their
    # gradients summed in fp32 inside the step, and the optimizer applied once
    grad_accum_steps: int = 1
    # Newton-Schulz matmul operands: bfloat16 (V4 reports NS stable with bf16 matmuls) | float32.
    # fp32 at HIGHEST precision misses the tensor cores: it was 0.85 s of a 1.5 s step on an H200.
    muon_ns_dtype: str = "bfloat16"
    engram_lr_multiplier: float = 5.0  # Engram tables' learning rate over the rest's (the paper's 5x)
    seed: int = 0  # model initialisation
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    eval_every: int = 0  # 0: no held-out evaluation during training
    eval_batches: int = 8
    peak_flops: float | None = None  # per device, for the MFU estimate (default: by device kind)

    def __post_init__(self):
        def need(ok, field, allowed):
            if not ok:
                raise ConfigError(f"train.{field}={getattr(self, field)!r} is not allowed: {allowed}")

        for f in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "eval_batches",
                  "grad_accum_steps"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, "an integer >= 1")
        for f in ("warmup_steps", "decay_start", "eval_every", "seed"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, "an integer >= 0")
        for f in ("lr", "lr_min", "clip_norm", "mtp_weight", "mtp_weight_after_decay", "balance_weight",
                  "bias_update_speed", "indexer_loss_weight", "engram_lr_multiplier"):
            v = getattr(self, f)
            need(_finite_number(v) and v >= 0, f, "a finite number >= 0 (at most 3.4e38, float32's limit)")
        need(self.lr > 0, "lr", "a number > 0")
        need(self.lr_min <= self.lr, "lr_min", f"at most lr={self.lr}")
        need(self.warmup_steps <= self.decay_start, "warmup_steps", f"at most decay_start={self.decay_start}")
        need(self.dtype in ("float32", "bfloat16"), "dtype", "float32 or bfloat16")
        need(self.precision in PRECISIONS, "precision", " | ".join(PRECISIONS))
        need(isinstance(self.indexer_fp4, bool), "indexer_fp4", "true or false")
        need(self.muon_ns_dtype in ("float32", "bfloat16"), "muon_ns_dtype", "float32 or bfloat16")
        need(self.attention in ("sparse", "dense"), "attention", "sparse or dense")
        need(self.peak_flops is None or (_finite_number(self.peak_flops) and self.peak_flops > 0), "peak_flops",
             "a finite number > 0 or null")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    parallel: ParallelConfig = ParallelConfig()
    post: PostConfig | None = None  # post-training (v4jax.post_training); None: pre-training or SFT

    def __post_init__(self):
        c = self.model.index_head_dim
        if self.train.indexer_fp4 and (c < 1 or c & (c - 1)):
            raise ConfigError(f"train.indexer_fp4 rotates the indexer's heads by a Hadamard matrix: it needs "
                              f"model.index_head_dim a power of two, got {c}")

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_hf_dict(), "train": dataclasses.asdict(self.train),
               "data": dataclasses.asdict(self.data), "parallel": dataclasses.asdict(self.parallel)}
        return out if self.post is None else {**out, "post": dataclasses.asdict(self.post)}


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    raw = load_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=200")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"override key {key!r} must be <section>.<field> with a section from {SECTIONS}")
        raw.setdefault(parts[0], {})[parts[1]] = parse_yaml(value)
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)} (allowed: {', '.join(SECTIONS)})")
    for section, cls in (("train", TrainConfig), ("data", DataConfig), ("parallel", ParallelConfig),
                         ("post", PostConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = set(raw.get(section) or {}) - fields
        if bad:
            raise ConfigError(f"unknown {section} field(s) {sorted(bad)}; known: {sorted(fields)}")
    model = ModelConfig.from_dict(raw["model"])
    train = TrainConfig(**(raw.get("train") or {}))
    data = DataConfig(**(raw.get("data") or {}))
    post = PostConfig(**raw["post"]) if raw.get("post") is not None else None
    try:
        parallel = ParallelConfig(**(raw.get("parallel") or {}))
    except ShardingError as e:
        raise ConfigError(str(e)) from None
    return RunConfig(model, train, data, parallel, post)


# --------------------------------------------------------------------------------------------------
# Schedule and optimizer


def learning_rate(cfg: TrainConfig, post: PostConfig | None = None) -> optax.Schedule:
    """Linear warm-up to ``lr``, constant, then cosine decay to ``lr_min`` from ``decay_start`` to
    ``steps``. With ``post``: that schedule for the ``post.sft_steps`` supervised steps, then
    ``post.lr`` for the policy steps."""
    warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    const = optax.constant_schedule(cfg.lr)
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - cfg.decay_start, 1), alpha=cfg.lr_min / cfg.lr)
    schedule = optax.join_schedules([warm, const, decay], [cfg.warmup_steps, cfg.decay_start])
    if post is None:
        return schedule
    return optax.join_schedules([schedule, optax.constant_schedule(post.lr)], [post.sft_steps])


def make_optimizer(cfg: TrainConfig, config: ModelConfig, mesh=None, post: PostConfig | None = None
                   ) -> optax.GradientTransformation:
    """Gradient clipping, then Muon/AdamW at ``learning_rate(cfg, post)``; with ``mesh`` (the
    parameters' device mesh) Muon's Newton-Schulz work is spread over all its devices
    (``v4jax.optim.orthogonalize_on_mesh``)."""
    ns = jnp.bfloat16 if cfg.muon_ns_dtype == "bfloat16" else F32
    opt = v4_optimizer(learning_rate(cfg, post), config, ns_dtype=ns, table_lr_multiplier=cfg.engram_lr_multiplier,
                       mesh=mesh)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt


def init_state(params, optimizer) -> dict:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


# --------------------------------------------------------------------------------------------------
# The step


def _layer_slots(config: ModelConfig, tree) -> list[tuple[dict, list[str]]]:
    """(layer tree, routing keys of its layers) for every main layer, then the MTP block. In the
    scan layout one slot of a stage holds the stacked leaves of several layers, keys in scan order."""
    if "stages" in tree:
        out = [(p, [str(i) for i in st.layer_ids(j)])
               for st, slots in zip(plan(config), tree["stages"], strict=True) for j, p in enumerate(slots)]
    else:
        out = [(p, [str(i)]) for i, p in enumerate(tree["layers"])]
    return out + ([(tree["mtp"], ["mtp"])] if "mtp" in tree else [])


def _biased_gates(config: ModelConfig, params) -> list[tuple[dict, list[str]]]:
    """(gate dict, routing keys of its layers) for every router with a bias (the learned ones; a
    hash-routed layer's gate has its table instead), main layers then MTP."""
    return [(p["ffn"]["gate"], keys) for p, keys in _layer_slots(config, params) if "bias" in p["ffn"]["gate"]]


def _indexers(config: ModelConfig, tree) -> list[tuple[dict, list[str]]]:
    """(attention dict holding an ``indexer``, routing keys of its layers) for every CSA layer with
    a lightning indexer, main layers then MTP."""
    return [(p["attn"], keys) for p, keys in _layer_slots(config, tree) if "indexer" in p["attn"]]


def _update_counts(batch) -> dict:
    """What weights a batch's losses as one update: its masked tokens (main and MTP), rows, and
    rows with a masked token (the policy objectives' sequences)."""
    return {"tokens": jnp.sum(batch["loss_mask"]), "mtp_tokens": jnp.sum(batch["mtp_mask"]),
            "rows": batch["tokens"].shape[0], "sequences": count_sequences(batch["loss_mask"])}


def _total_loss(cfg: TrainConfig, step, lm, mtp, balance, indexer):
    """The training loss from its terms (spec §4); mtp is None for a model without the MTP block."""
    loss = lm
    if mtp is not None:
        loss = loss + jnp.where(step >= cfg.decay_start, cfg.mtp_weight_after_decay, cfg.mtp_weight) * mtp
    return loss + cfg.balance_weight * balance + cfg.indexer_loss_weight * indexer


def loss_fn(params, batch, config: ModelConfig, cfg: TrainConfig, step, parallel=None, mesh=None, update=None,
            objective=None):
    """The training loss of ``batch`` and (metrics, per-layer statistics).

    objective: None for the language-model loss (main and MTP cross-entropy). Post-training passes
    its own (``v4jax.post_training``): ``objective(hidden, head, batch, update) -> (loss, metrics)``
    replaces the cross-entropy terms (the MTP block is not run); the routing and indexer terms stay.

    update: None when the batch is the whole update. For a micro-batch of a larger update, its
    {"tokens", "mtp_tokens", "rows", "sequences"} (``_update_counts``): the cross-entropies are
    divided by the update's token counts and the balance loss (a mean over rows) weighted by rows /
    update rows, so that the micro-batches' losses and gradients add up to the update's; each
    layer's indexer KL is left as its sum over queries (the update's query count divides its
    gradient later: ``_scale_indexers``).
    The statistics, by routing key (str(layer), "mtp"): ``load`` [E], ``kl_sum`` and ``kl_count``.
    """
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else F32
    has_mtp = "mtp" in params and objective is None
    mask = batch["segment_ids"] > 0  # real tokens (padding has segment 0)
    used = for_training(params, config, cfg.precision, cfg.indexer_fp4)  # quantised as train.precision says
    out = forward(used, batch["tokens"], config, positions=batch["positions"], segment_ids=batch["segment_ids"],
                  dtype=dtype, sparse=cfg.attention == "sparse", mtp=has_mtp,
                  with_aux=cfg.indexer_loss_weight > 0, parallel=parallel, mesh=mesh,
                  layer_stats=lambda info, layer: layer_routing_stats(info, layer, config, mask), logits=False,
                  engram_ids=batch.get("engram_ids"))
    stats = {str(i): s for i, s in enumerate(out["routing"])}
    if has_mtp:
        stats["mtp"] = out["mtp_routing"]
    chunk = (parallel or ParallelConfig()).loss_chunk
    whole = update is None
    update = update or _update_counts(batch)

    def ce(hidden, targets, loss_mask, tokens):  # the mean over the update's masked tokens
        weights = loss_mask.astype(F32) / jnp.maximum(tokens.astype(F32), 1.0)
        return weighted_nll(hidden, whole_rows(params["head"], mesh), targets, weights, chunk,
                            batch_shards(mesh, hidden.shape[0]), context.ways(mesh))

    if objective is None:
        lm = ce(out["hidden"], batch["targets"], batch["loss_mask"], update["tokens"])
        metrics = {"lm_loss": lm}
    else:
        lm, metrics = objective(out["hidden"], whole_rows(params["head"], mesh), batch, update)
        metrics = {"policy_loss": lm, **metrics}
    balance, kl_sums, kl_counts = routing_losses(list(stats.values()))
    balance = balance * (batch["tokens"].shape[0] / update["rows"])
    kl_norm = [jnp.maximum(c, 1.0) if whole else 1.0 for c in kl_counts]
    indexer = jnp.mean(jnp.stack([s / n for s, n in zip(kl_sums, kl_norm)])) if kl_sums else jnp.zeros((), F32)
    mtp = ce(out["mtp_hidden"], batch["mtp_targets"], batch["mtp_mask"], update["mtp_tokens"]) if has_mtp else None
    loss = _total_loss(cfg, step, lm, mtp, balance, indexer)
    if has_mtp:
        metrics["mtp_loss"] = mtp
    metrics.update(balance_loss=balance, dropped_tokens=sum(s["dropped"] for s in stats.values()))
    if whole:
        metrics["indexer_loss"] = indexer
    layer = {k: {"load": s["load"], **({"kl_sum": s["kl_sum"], "kl_count": s["kl_count"]} if "kl_sum" in s else {})}
             for k, s in stats.items()}
    return loss, (metrics, layer)


def _scale_indexers(grads, config: ModelConfig, kl_counts: dict) -> dict:
    """Divide each CSA layer's indexer gradients by its query count over the update. Only the
    indexer KL reaches an indexer's parameters (its inputs are detached and its top-k carries no
    gradient), so this turns the gradient of the summed KL into that of the mean."""
    for attn, keys in _indexers(config, grads):
        if not all(k in kl_counts for k in keys):  # no indexer loss: nothing reached the indexer
            continue
        scale = 1.0 / jnp.maximum(jnp.stack([kl_counts[k] for k in keys]), 1.0)
        attn["indexer"] = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1))
                                       if "stages" in grads else g * scale[0], attn["indexer"])
    return grads


def update_gradients(params, batch, config: ModelConfig, cfg: TrainConfig, step, parallel=None, mesh=None,
                     objective=None):
    """Loss, gradients and statistics of one optimizer update over ``batch`` [B, ...]: the batch at
    once, or (``cfg.grad_accum_steps`` = k > 1) as k micro-batches of B/k rows in a scan, summing
    fp32 gradients, losses and expert loads so that the result is the whole batch's (up to float
    rounding) with one micro-batch's activations in memory. Micro-batch j takes rows j, j+k, ...,
    so each is split over the batch's devices like the batch. Returns (loss, grads, metrics,
    {routing key: load [E]}); integer leaves get zero gradients. ``objective`` as in ``loss_fn``."""
    k = cfg.grad_accum_steps

    def zero_ints(g, p):  # integer leaves (hash tables) get float0 "gradients"
        return jnp.zeros(p.shape, F32) if g.dtype == jax.dtypes.float0 else g

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)
    if k == 1:
        (loss, (metrics, layer)), grads = grad_fn(params, batch, config, cfg, step, parallel, mesh, None, objective)
        return loss, jax.tree.map(zero_ints, grads, params), metrics, {key: s["load"] for key, s in layer.items()}
    rows = batch["tokens"].shape[0]
    if rows % k:
        raise ConfigError(f"data.batch_size={rows} must be divisible by train.grad_accum_steps={k}")
    update = _update_counts(batch)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((rows // k, k) + x.shape[1:]), 0, 1), batch)
    shapes_of_one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)

    def micro_update(mb):
        (_, (metrics, layer)), grads = grad_fn(params, mb, config, cfg, step, parallel, mesh, update, objective)
        grads = jax.tree.map(zero_ints, grads, params)
        if mesh is not None:  # reduce-scattered to the parameters' layout before they are summed
            grads = jax.lax.with_sharding_constraint(grads, param_shardings(grads, mesh, config))
        return grads, metrics, layer

    def add(acc, mb):
        return jax.tree.map(jnp.add, acc, micro_update(mb)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(micro_update, shapes_of_one))
    if mesh is not None:
        zeros = (jax.lax.with_sharding_constraint(zeros[0], param_shardings(zeros[0], mesh, config)), *zeros[1:])
    (grads, metrics, layer), _ = jax.lax.scan(add, zeros, micro)
    kl = {key: s["kl_sum"] / jnp.maximum(s["kl_count"], 1.0) for key, s in layer.items() if "kl_sum" in s}
    grads = _scale_indexers(grads, config, {key: s["kl_count"] for key, s in layer.items() if "kl_count" in s})
    metrics["indexer_loss"] = jnp.mean(jnp.stack(list(kl.values()))) if kl else jnp.zeros((), F32)
    main = metrics["lm_loss" if objective is None else "policy_loss"]
    loss = _total_loss(cfg, step, main, metrics.get("mtp_loss"), metrics["balance_loss"], metrics["indexer_loss"])
    return loss, grads, metrics, {key: s["load"] for key, s in layer.items()}


def make_train_step(config: ModelConfig, cfg: TrainConfig, optimizer, parallel=None, mesh=None, objective=None,
                    post: PostConfig | None = None):
    """A jitted ``step(state, batch) -> (state, metrics)``; see the module docstring. With ``mesh``
    the state keeps the shardings it was placed with and the batch is split over the batch axes.
    ``objective``: a post-training objective in place of the language-model loss (``loss_fn``);
    ``post``: the run's post-training section (for the learning rate it logs)."""

    def step_fn(state, batch):
        params = state["params"]
        loss, grads, metrics, loads_by_layer = update_gradients(params, batch, config, cfg, state["step"], parallel,
                                                                mesh, objective)
        if mesh is not None:  # gradients sharded like their parameters: reduce-scattered, not all-reduced
            grads = jax.lax.with_sharding_constraint(grads, param_shardings(grads, mesh, config))
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        @jax.named_scope("optimizer")
        def apply(state):
            # Under a conditional, so a step skipped for its loss or gradient keeps the (donated)
            # state buffers as they are instead of computing a new state beside the old one.
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            new_params = optax.apply_updates(state["params"], updates)
            for gate, keys in _biased_gates(config, new_params):
                if not all(key in loads_by_layer for key in keys):  # not run: MTP under a post-training objective
                    continue
                load = [loads_by_layer[key] for key in keys]
                load = load[0] if gate["bias"].ndim == 1 else jnp.stack(load)
                gate["bias"] = update_router_bias(gate["bias"], load, cfg.bias_update_speed)
            # A finite loss and gradient can still give inf or nan parameters or moments (lr=3e38
            # overflows float32 in a few parameters). One fused reduction over the new state says so,
            # without keeping the old state alive beside it (see the module docstring).
            new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
            return new, all_finite((new_params, opt_state))

        def skip(state):  # the state is as it came in, finite
            return {**state, "step": state["step"] + 1}, jnp.array(True)

        new_state, state_finite = jax.lax.cond(ok, apply, skip, state)
        if mesh is not None:
            # Pin the new state to the rules' shardings. Left to propagation, an 8-GPU compile of
            # V4-Flash (mock multi-host topology) returned the whole state replicated on every device.
            new_state = jax.lax.with_sharding_constraint(
                new_state, shard_like_params(new_state, new_state["params"], mesh, config))
        loads = [loads_by_layer[key] for _, keys in _biased_gates(config, params) for key in keys
                 if key in loads_by_layer]
        imbalance = (jnp.mean(jnp.stack([jnp.max(ld) / jnp.maximum(jnp.mean(ld), 1e-9) for ld in loads]))
                     if loads else jnp.zeros(()))
        metrics.update(loss=loss, grad_norm=grad_norm, ok=ok & state_finite, state_finite=state_finite,
                       lr=learning_rate(cfg, post)(state["step"]),
                       max_load_over_mean=imbalance, tokens=jnp.sum(batch["segment_ids"] > 0))
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,))


def make_eval_step(config: ModelConfig, dtype=F32, parallel=None, mesh=None, precision: str = "bf16",
                   indexer_fp4: bool = False):
    """Jitted ``eval(params, batch) -> sums`` of main/MTP token losses and token counts, quantised as
    ``precision`` and ``indexer_fp4`` (``train.precision``, ``train.indexer_fp4``) have it in training."""

    chunk = (parallel or ParallelConfig()).loss_chunk

    def eval_fn(params, batch):
        has_mtp = "mtp" in params
        used = for_training(params, config, precision, indexer_fp4)
        out = forward(used, batch["tokens"], config, positions=batch["positions"],
                      segment_ids=batch["segment_ids"], dtype=dtype, mtp=has_mtp, parallel=parallel, mesh=mesh,
                      logits=False, engram_ids=batch.get("engram_ids"))
        res = {}
        for name, hidden, tgt, m in (("main", out["hidden"], batch["targets"], batch["loss_mask"]),
                                     ("mtp", out.get("mtp_hidden"), batch["mtp_targets"], batch["mtp_mask"])):
            if hidden is None:
                continue
            # the fp32 head, as in logits
            head = whole_rows(params["head"], mesh)
            res[f"{name}_nll"] = weighted_nll(hidden.astype(F32), head, tgt, m.astype(F32), chunk,
                                              batch_shards(mesh, hidden.shape[0]), context.ways(mesh))
            res[f"{name}_tokens"] = jnp.sum(m)
        return res

    return jax.jit(eval_fn)


def evaluate(eval_fn, params, batches) -> dict[str, dict[str, float]]:
    """Token-weighted mean loss of each head over an iterable of batches (device arrays):
    {"main": {"loss", "tokens"}, "mtp": {...}} (mtp only when the model has the block)."""
    sums: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(eval_fn(params, batch)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {head: {"loss": sums[f"{head}_nll"] / max(sums[f"{head}_tokens"], 1.0),
                   "tokens": sums[f"{head}_tokens"]}
            for head in ("main", "mtp") if f"{head}_tokens" in sums}


# --------------------------------------------------------------------------------------------------
# FLOPs and MFU

_PEAK_FLOPS = {  # dense bf16 per chip, from the vendors' datasheets
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6 lite": 918e12,
}
CPU_PEAK_FLOPS_PER_CORE = 50e9  # a rough fp32 figure for a current x86 core; MFU on CPU is indicative only


def peak_flops(cfg: TrainConfig) -> float:
    if cfg.peak_flops:
        return cfg.peak_flops * jax.device_count()
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return CPU_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1)
    for name, flops in _PEAK_FLOPS.items():
        if dev.device_kind.startswith(name):
            return flops * jax.device_count()
    return float("nan")


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (embedding lookup excluded; the MTP
    block counted) plus attention scores and values over window and compressed keys."""
    counts = param_count(config)
    active = counts["active"] + counts["mtp"] - config.vocab_size * config.hidden_size
    keys = []
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        kind, m = config.layer_type(layer), config.layer_ratio(layer)
        k = min(config.sliding_window, seq_len)
        if m:
            visible = seq_len / m / 2  # visible entries averaged over positions
            k += min(config.index_topk, visible) if kind.startswith("compressed_sparse") else visible
        keys.append(k)
    attention = sum(12 * config.num_attention_heads * config.head_dim * k for k in keys)
    return 6 * active + attention



def state_specs(config: ModelConfig, cfg: TrainConfig, scan: bool, mesh: jax.sharding.Mesh | None) -> dict:
    """The train state's ShapeDtypeStructs (nothing allocated or read): what a checkpoint restores
    into, sharded over ``mesh`` by the parameters' rules, or without one onto this process's first
    device (not the saved shardings: those name the devices of the run that saved it)."""
    specs = param_specs(config, scan=scan)
    state = jax.eval_shape(lambda p: init_state(p, make_optimizer(cfg, config)), specs)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, state)
    else:
        shardings = shard_like_params(state, state["params"], mesh, config)
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, shardings)


def restore_run(workdir, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> dict | None:
    """A train.py run's checkpoint: {config, train, data, state}, the state restored in the run's
    parameter layout; None if the workdir has no checkpoint. ``step`` picks one (a broken one raises
    v4jax.checkpoint.CheckpointError, a ValueError naming its directory); by default the newest step
    that restores is taken, each broken newer one skipped with a warning. The state is restored
    sharded over ``mesh`` by the parameters' rules, or without one onto this process's first
    device: whatever the devices and processes of the run that saved it."""
    def target(meta):
        return state_specs(model_config_from_meta(meta), TrainConfig(**meta["train"]), scan_layers_from_meta(meta),
                           mesh)

    ckpt = Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    try:
        if ckpt.latest_step() is None:
            return None
        state, _, meta = ckpt.restore(target, step, data=False)
    finally:
        ckpt.close()
    return {"config": model_config_from_meta(meta), "train": TrainConfig(**meta["train"]),
            "data": DataConfig(**meta["data"]), "state": state}
