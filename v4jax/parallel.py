"""Device mesh, logical-axis sharding rules, and multi-host start-up.

Mesh axes: ``data``, ``fsdp``, ``expert``, ``context``, ``tensor`` (any may be 1). Parameters carry logical axis
names (``vocab``, ``embed``, ``heads``, ``mlp``, ``experts``) in their declarations
(``v4jax.params``), and one table maps logical names to mesh axes. Changing the parallel layout means changing the table
(or the mesh shape), not the model.

Default table::

    batch   -> (data, fsdp, expert)   activations: batch rows split over every data-like axis
    length  -> context                activations: each row's tokens split (``v4jax.context``)
    vocab   -> tensor                 embed/head rows
    embed   -> (fsdp, context)        the model dimension of every weight (ZeRO-3 style: the context
                                      devices hold different tokens of the same rows, as data would)
    heads   -> tensor                 attention heads (q, output groups, sinks, indexer heads)
    mlp     -> tensor                 expert and shared-expert hidden size
    experts -> expert                 routed experts
    table_rows -> every axis          Engram's n-gram tables: rows split over all devices

The mesh's device order puts ``tensor`` innermost and ``context`` next to it: their collectives
run every layer, so on a multi-host pod they stay within a host while their product fits one.

A dimension that the mesh axes do not divide is replicated instead. Several logical axes may share a
mesh axis when no tensor has both (vocab, heads and mlp all use ``tensor``); a tensor whose logical
axes would put one mesh axis on two of its dimensions is refused, naming the axes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
DEFAULT_RULES = {"batch": ("data", "fsdp", "expert"), "length": ("context",), "vocab": ("tensor",),
                 "embed": ("fsdp", "context"), "heads": ("tensor",), "mlp": ("tensor",), "experts": ("expert",),
                 "table_rows": ("data", "fsdp", "expert", "context", "tensor")}


class ShardingError(ValueError):
    """A mesh or rule table that cannot work, with the reason."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the model runs on devices. The ``parallel:`` section of a YAML config.

    data, fsdp, expert, context, tensor: the mesh's axis sizes (their product must be the device
    count; one entry may be -1 to take the rest). ``context`` splits each sequence over its devices
    (``v4jax.context``): training, evaluation and ``Model.logits``; generation leaves it unused.
    expert_over_context: the routed experts are split over the ``expert`` and ``context`` axes
    together (each context device holds its own experts; tokens reach them by all_to_all), as
    Megatron folds expert parallelism over context-parallel ranks. Off (the default), each device
    gathers its expert-axis group's experts every layer (over ``context`` like any weight). On, a
    row too long for a batch that fills the ``expert`` axis still runs expert-parallel: one 1M-token
    row on ``context=128, tensor=2`` puts 2 of V4-Flash's 256 experts on each device. The dispatch
    (``moe_dispatch``, ``capacity_factor``) is that of the expert axis.
    moe_dispatch: "capacity" (all_to_all with fixed per-device capacity; runs everywhere, drops
    tokens over capacity and counts them) or "ragged" (dropless ragged_all_to_all; GPU/TPU only).
    moe_backend: grouped matmul "auto" (the default: "tokamax" on a GPU/TPU where tokamax is
    installed, else "ragged_dot"; dropless either way), "ragged_dot" (jax.lax.ragged_dot, the
    reference), "tokamax" (tokamax's kernels, one per product of the forward and backward pass), or
    "padded" (sort-and-pad into a batched matmul with per-expert capacity capacity_factor x the mean
    load; rows past it get no expert output and are counted in ``dropped_tokens``).
    attention_chunk, indexer_key_chunk, loss_chunk: how many queries the attention and the indexer
    take per step, entries per step of the indexer's running top-k, and tokens per step and batch
    shard of the LM head's cross-entropy (the next positions of every row). They bound memory per
    step and never change a result.
    attention_kernel: the index-list attention as "xla" (``v4jax.index_list.sparse_attention``) or
    "pallas" (``v4jax.attention_kernel``'s Triton kernels on GPU, interpreted on CPU; same result).
    csa_mask_ratio: in the xla attention, CSA's top-k entries are a mask over all of a row's entries
    (dense matmuls, no gathers) while the row has at most csa_mask_ratio x index_topk entries (at
    4: sequences up to 16 x index_topk tokens); 0: always gathered. Never changes a result.
    unroll_stages: with scan_layers, the stages (``v4jax.scan.plan``) of at most this many repeats
    run unrolled. Their parameters keep the scan layout (checkpoints do not change); the loop's
    per-stage residual stacks go (on an H200 their slices were device copies of a tenth of the
    step), and each of their layers is compiled. The default 3 unrolls V4-Flash's and V4-Pro's
    first three layers and keeps their long (HCA, CSA) stage a loop. Never changes a result.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    context: int = 1
    expert_over_context: bool = False
    moe_dispatch: str = "capacity"
    moe_backend: str = "auto"
    capacity_factor: float = 2.0
    remat: str = "none"  # none | full (recompute each block in the backward pass) | dots (keep matmul outputs)
    scan_layers: bool = True  # train on the scan layout (v4jax.scan): compile time independent of depth
    unroll_stages: int = 3  # with scan_layers: stages of at most this many repeats run unrolled
    attention_chunk: int = 512
    indexer_key_chunk: int = 8192
    loss_chunk: int = 4096
    attention_kernel: str = "xla"
    csa_mask_ratio: int = 4

    def __post_init__(self):
        sizes = self.sizes()
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ShardingError(f"parallel mesh sizes {dict(zip(MESH_AXES, sizes))}: use positive sizes, "
                                "at most one -1")
        if not isinstance(self.expert_over_context, bool):
            raise ShardingError(f"parallel.expert_over_context={self.expert_over_context!r}: true or false")
        if self.moe_dispatch not in ("capacity", "ragged"):
            raise ShardingError(f"parallel.moe_dispatch={self.moe_dispatch!r}: capacity or ragged")
        if self.moe_backend not in ("auto", "ragged_dot", "padded", "tokamax"):
            raise ShardingError(f"parallel.moe_backend={self.moe_backend!r}: auto, ragged_dot, padded or tokamax")
        if not self.capacity_factor > 0:
            raise ShardingError(f"parallel.capacity_factor={self.capacity_factor!r}: must be > 0")
        for name, low in (("attention_chunk", 1), ("indexer_key_chunk", 1), ("loss_chunk", 1), ("csa_mask_ratio", 0),
                          ("unroll_stages", 0)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise ShardingError(f"parallel.{name}={v!r}: must be an integer >= {low}")
        if self.remat not in REMAT_POLICIES:
            raise ShardingError(f"parallel.remat={self.remat!r}: one of {sorted(REMAT_POLICIES)}")
        if self.attention_kernel not in ("xla", "pallas"):
            raise ShardingError(f"parallel.attention_kernel={self.attention_kernel!r}: xla or pallas")

    def sizes(self) -> list[int]:
        """The axis sizes in ``MESH_AXES`` order (-1 not yet resolved)."""
        return [getattr(self, a) for a in MESH_AXES]

    def mesh_shape(self, n_devices: int) -> tuple[int, ...]:
        sizes = self.sizes()
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if n_devices % known:
                raise ShardingError(f"{n_devices} devices cannot be split as {dict(zip(MESH_AXES, sizes))}")
            sizes[sizes.index(-1)] = n_devices // known
        if int(np.prod(sizes)) != n_devices:
            raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                                f"there are {n_devices}")
        return tuple(sizes)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_mesh(cfg: ParallelConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ``MESH_AXES`` over ``devices`` (default: all)."""
    cfg = cfg or ParallelConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.mesh_shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def adopt_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """Any ``jax.sharding.Mesh`` as a v4jax mesh: the same devices on the axes ``MESH_AXES``, those
    the mesh does not name of size 1, all of axis type Auto (v4jax places arrays by
    its rules; a mesh from ``jax.make_mesh`` has Explicit axes by default, under which jax wants a
    sharding rule for every op). An axis of another name must have size 1."""
    names = tuple(mesh.axis_names)
    foreign = {a: mesh.shape[a] for a in names if a not in MESH_AXES and mesh.shape[a] > 1}
    if foreign:
        raise ShardingError(f"mesh axes {foreign} are not v4jax's: name the axes among {', '.join(MESH_AXES)} "
                            "(e.g. jax.make_mesh((2, 4), ('data', 'expert'))) or use v4jax.parallel.make_mesh")
    order = [names.index(a) for a in MESH_AXES if a in names] + [i for i, a in enumerate(names) if a not in MESH_AXES]
    devices = np.asarray(mesh.devices).transpose(order).reshape([mesh.shape.get(a, 1) for a in MESH_AXES])
    return jax.sharding.Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------------------------------
# Rules


def validate_rules(rules: Mapping[str, tuple[str, ...]]) -> None:
    """Every target is a mesh axis, named once per rule (``v4jax.schema.check_rule_axes`` checks the
    rules against a model's parameters)."""
    for logical, axes in rules.items():
        if len(set(axes)) != len(axes) or any(a not in MESH_AXES for a in axes):
            raise ShardingError(f"rule {logical!r} -> {axes!r}: name each mesh axis ({MESH_AXES}) at most once")


def spec_for(logical: tuple, shape: tuple, mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of a tensor with these logical axes on a mesh (or a {axis: size} mapping); axes
    the mesh does not divide are dropped."""
    sizes = mesh if isinstance(mesh, Mapping) else dict(mesh.shape)
    used, out = set(), []
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in (rules.get(name, ()) if name else ()) if sizes.get(a, 1) > 1)
        clash = used.intersection(axes)
        if clash:
            raise ShardingError(f"logical axes {logical} put mesh axis {sorted(clash)} on two dimensions")
        if axes and dim % int(np.prod([sizes[a] for a in axes])) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def batch_sharding(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def batch_shards(mesh: jax.sharding.Mesh | None, rows: int, rules=DEFAULT_RULES) -> int:
    """How many ways ``rows`` rows are split over the mesh's batch axes: their product, or 1 without
    a mesh or where it does not divide the rows (as ``constrain_batch`` leaves them)."""
    if mesh is None:
        return 1
    k = int(np.prod([mesh.shape[a] for a in rules["batch"]]))
    return 1 if rows % k else k


def whole_rows(w: jax.Array, mesh: jax.sharding.Mesh | None, rules=DEFAULT_RULES) -> jax.Array:
    """The LM head w [V, d] gathered over its ``embed`` split (rows stay split over ``vocab``'s
    axes), for the loss. Left to XLA, a head split over ``context`` made the compiler split the
    head's product along d and gather every slice's tokens instead: a [tokens of all slices, V]
    logits buffer per device (31.6 GiB for V4-Flash at 128K on v5p-256)."""
    if mesh is None:
        return w
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, spec_for(("vocab", None), w.shape, mesh, rules)))


def token_axes(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes of size > 1 that split the tokens of a batch [b, s] flattened to [b*s] (row
    major): the batch axes, then ``context``."""
    return tuple(a for a in (*rules["batch"], *rules["length"]) if mesh.shape.get(a, 1) > 1)


def expert_axes(mesh: jax.sharding.Mesh, parallel: ParallelConfig | None = None) -> tuple[str, ...]:
    """The mesh axes of size > 1 that the MoE splits the routed experts over: ``expert``, then
    ``context`` with ``parallel.expert_over_context`` (empty: no expert parallelism)."""
    axes = ("expert", "context") if parallel is not None and parallel.expert_over_context else ("expert",)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def constrain_tokens(x: jax.Array, mesh: jax.sharding.Mesh | None, rules=DEFAULT_RULES) -> jax.Array:
    """Constrain an activation [b, s, ...] to rows split over the mesh's batch axes and tokens over
    ``context``, each where it divides (used at block boundaries); a no-op without a mesh."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    if batch_shards(mesh, x.shape[0], rules) > 1:
        spec[0] = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    context = tuple(a for a in rules["length"] if mesh.shape.get(a, 1) > 1)
    if context and x.ndim > 1 and x.shape[1] % int(np.prod([mesh.shape[a] for a in context])) == 0:
        spec[1] = context
    if spec == [None] * x.ndim:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


# --------------------------------------------------------------------------------------------------
# Multi-host


def initialize_distributed() -> bool:
    """Start jax.distributed when the environment describes a multi-process job.

    TPU pods: the TPU runtime's environment is detected by jax itself. GPU clusters: set
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run
    under SLURM / Open MPI, which jax detects. Returns True if it initialised.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                                            "MEGASCALE_COORDINATOR_ADDRESS"))
    if not (explicit or cluster):
        return False
    if explicit:
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True
