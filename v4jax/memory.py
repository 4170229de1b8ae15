"""Ahead-of-time memory planning: compile the training step on abstract shapes, allocate nothing.

    report = training_memory(config, train_cfg, parallel, mesh, batch_size, seq_len)

Parameters, optimizer state and the batch are ``jax.ShapeDtypeStruct``s carrying the shardings the
rules give them on ``mesh``; the step is lowered and compiled for the mesh's devices (real ones, fake
CPU devices from ``--xla_force_host_platform_device_count``, or an ahead-of-time TPU topology), and
XLA's memory analysis gives the per-device bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.config import ModelConfig
from v4jax.model import param_specs
from v4jax.parallel import ParallelConfig, batch_sharding
from v4jax.schema import param_shardings, shard_like_params
from v4jax.trainer import TrainConfig, init_state, make_optimizer, make_train_step

BATCH_FIELDS = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32, "targets": jnp.int32,
                "loss_mask": jnp.float32, "mtp_targets": jnp.int32, "mtp_mask": jnp.float32}


def abstract_state(config: ModelConfig, cfg: TrainConfig, mesh, scan: bool = True):
    specs = param_specs(config, scan=scan)
    shardings = param_shardings(specs, mesh, config)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shardings)
    state = jax.eval_shape(lambda p: init_state(p, make_optimizer(cfg, config)), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                        shard_like_params(state, specs, mesh, config))


def training_memory(config: ModelConfig, cfg: TrainConfig, parallel: ParallelConfig, mesh, batch_size: int,
                    seq_len: int) -> dict:
    """Per-device bytes of the compiled training step (arguments, outputs, temporaries) and totals."""
    state = abstract_state(config, cfg, mesh, parallel.scan_layers)
    sharding = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sharding) for k, dt in BATCH_FIELDS.items()}
    if config.engram is not None:
        e = config.engram
        batch["engram_ids"] = jax.ShapeDtypeStruct((batch_size, seq_len, len(e.layers), (e.max_ngram - 1) * e.heads),
                                                   jnp.int32, sharding=sharding)
    step = make_train_step(config, cfg, make_optimizer(cfg, config, mesh), parallel, mesh)  # as train.py
    compiled = step.lower(state, batch).compile()
    m = compiled.memory_analysis()
    state_bytes = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(state))
    out = {
        "devices": mesh.size, "mesh": dict(mesh.shape), "batch_size": batch_size, "seq_len": seq_len,
        "state_bytes_total": int(state_bytes),
        "argument_bytes_per_device": int(m.argument_size_in_bytes),
        "output_bytes_per_device": int(m.output_size_in_bytes),
        "alias_bytes_per_device": int(m.alias_size_in_bytes),
        "temp_bytes_per_device": int(m.temp_size_in_bytes),
    }
    out["peak_estimate_bytes_per_device"] = (out["argument_bytes_per_device"] + out["output_bytes_per_device"]
                                             - out["alias_bytes_per_device"] + out["temp_bytes_per_device"])
    return out
