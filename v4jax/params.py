"""What a parameter is: one declaration per parameter, from which everything else is derived.

Every module (``v4jax.mhc``, ``attention``, ``moe``, ``model``) creates its parameters with
``declare``: an ``nnx.Param`` whose metadata ``info`` is a ``ParamInfo``. Derived from it, and
from nowhere else:

* initial values and abstract shapes (``v4jax.model.init_params`` / ``param_specs``);
* shardings: the logical axes through ``v4jax.parallel``'s rule table (``v4jax.schema.param_shardings``);
* the optimizer group and Muon's row blocks (``v4jax.optim``);
* the format ``to-safetensors`` writes (``v4jax.convert.orbax_to_safetensors``), the one
  ``train.precision`` quantises to and the one weights are kept in (``v4jax.schema``).

The attribute names are the release's tensor names, so a parameter's tree path is its official
name up to a rename (``v4jax.convert.names``).

Modules are used functionally (flax NNX tree mode): a module is a pytree, and the training state
holds its *pure* tree, ``pure(module)``: nested dicts (and lists for the layers) of arrays with
the same names; ``declarations(module)`` is the matching tree of ``ParamInfo``s. The whole model's
declarations by path, in either layout, are ``v4jax.schema``'s (above the model, which this
module lies below).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# Optimizer groups (spec §4): Muon for matrices; AdamW for the embedding and head; AdamW without
# weight decay for norms, biases, sinks, position biases and mHC base/scale; frozen: never updated
# by the optimizer (the hash table, and the router bias, which follows its own rule); table: Engram's
# n-gram tables (AdamW, no weight decay, the learning rate times ``train.engram_lr_multiplier``).
MUON, ADAMW, ADAMW_NO_DECAY, FROZEN, TABLE = "muon", "adamw", "adamw_no_decay", "frozen", "table"
LABELS = (MUON, ADAMW, ADAMW_NO_DECAY, FROZEN, TABLE)
INITS = ("normal", "unit_normal", "normal_zero_last_block", "ones", "zeros", "hc_scale", "hash")
KINDS = ("param", "f32", "int")
EXPORTS = ("fp8", "experts", "plain", "f32", "int")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """Everything v4jax knows about one parameter, declared where its module creates it."""

    shape: tuple[int, ...]
    init: str  # normal: N(0, initializer_range) | unit_normal: N(0, 1) | normal_zero_last_block: normal with
    # the last row block zero | ones | zeros | hc_scale: 0.01 | hash: K distinct experts a row
    kind: str  # param: stored in the model dtype | f32: kept in fp32, as in the release | int
    axes: tuple  # a logical axis name (or None) per dimension; v4jax.parallel maps them to mesh axes
    optimizer: str  # one of LABELS
    row_blocks: tuple[int, ...] | None = None  # Muon: row counts of the separate matrices fused here
    export: str = "plain"  # to-safetensors: fp8 (when quantising) | experts (fp8 or fp4) | plain | f32 | int

    def __post_init__(self):
        problems = []
        if len(self.axes) != len(self.shape):
            problems.append(f"{len(self.axes)} logical axes for {len(self.shape)} dimensions")
        if self.init not in INITS or self.kind not in KINDS or self.optimizer not in LABELS:
            problems.append(f"init/kind/optimizer must come from {INITS} / {KINDS} / {LABELS}")
        if self.export not in EXPORTS:
            problems.append(f"export must be one of {EXPORTS}")
        if self.optimizer == MUON and len(self.shape) < 2:
            problems.append("Muon needs a matrix")
        if self.row_blocks is not None and (self.optimizer != MUON or sum(self.row_blocks) != self.shape[-2]):
            problems.append(f"row blocks {self.row_blocks} must be Muon's and sum to the {self.shape[-2]} rows")
        if (self.kind == "f32") != (self.export == "f32") or (self.kind == "int") != (self.export == "int"):
            problems.append("fp32-kept and integer parameters are exported as such, and only they")
        if problems:
            raise ValueError(f"bad parameter declaration {self}: " + "; ".join(problems))

    def dtype(self, model_dtype) -> jnp.dtype:
        return jnp.dtype({"param": model_dtype, "f32": jnp.float32, "int": jnp.int32}[self.kind])

    def stacked(self, n: int) -> ParamInfo:
        """The declaration of n such parameters stacked on a new leading (layer) axis."""
        return dataclasses.replace(self, shape=(n,) + self.shape, axes=(None,) + self.axes)


def matrix(shape, axes, *, export="plain", row_blocks=None, init="normal") -> ParamInfo:
    """A weight matrix (or a stack of them: leading axes are a batch), trained by Muon."""
    return ParamInfo(tuple(shape), init, "param", tuple(axes), MUON, row_blocks, export)


def vector(shape, axes=None, *, init="ones", kind="param") -> ParamInfo:
    """A norm weight, bias or other small tensor: AdamW without weight decay."""
    shape = tuple(shape)
    return ParamInfo(shape, init, kind, tuple(axes) if axes else (None,) * len(shape), ADAMW_NO_DECAY,
                     export="f32" if kind == "f32" else "plain")


class Init:
    """How ``declare`` makes values: random from ``rngs``, or abstract (``jax.ShapeDtypeStruct``s,
    nothing computed) when ``rngs`` is None. Abstract is how V4-Pro's 1.6T parameters are declared
    in a fraction of a second (tracing the random initialisers under ``nnx.eval_shape`` took 40 s)."""

    def __init__(self, rngs: nnx.Rngs | None, dtype, std: float, n_experts: int):
        self.rngs, self.dtype, self.std, self.n_experts = rngs, jnp.dtype(dtype), std, n_experts

    def value(self, info: ParamInfo):
        dt = info.dtype(self.dtype)
        if self.rngs is None:
            return jax.ShapeDtypeStruct(info.shape, dt)
        if info.init in ("normal", "unit_normal", "normal_zero_last_block"):
            std = 1.0 if info.init == "unit_normal" else self.std
            value = jax.random.normal(self.rngs.params(), info.shape, jnp.float32) * std
            if info.init == "normal_zero_last_block":  # e.g. Engram v4.1's value rows: a no-op at first
                value = value.at[..., info.shape[-2] - info.row_blocks[-1]:, :].set(0.0)
            return value.astype(dt)
        if info.init == "hash":  # each token id gets K distinct experts
            u = jax.random.uniform(self.rngs.params(), (info.shape[0], self.n_experts))
            return jnp.argsort(u, axis=1)[:, : info.shape[1]].astype(dt)
        return jnp.full(info.shape, {"ones": 1.0, "zeros": 0.0, "hc_scale": 0.01}[info.init], dt)


def declare(init: Init, info: ParamInfo) -> nnx.Param:
    """The parameter ``info`` describes, with its first value."""
    return nnx.Param(init.value(info), info=info)


# --------------------------------------------------------------------------------------------------
# Pure trees


def iter_params(module: nnx.Module):
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            yield path, node


def nest(items: dict):
    """{path: leaf} -> nested dicts, with lists where every key of a level is 0..n-1."""
    tree: dict = {}
    for path, leaf in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(isinstance(k, int) for k in node):
            return [fix(node[i]) for i in range(len(node))]
        return {k: fix(v) for k, v in node.items()}

    return fix(tree)


def pure(module: nnx.Module):
    """The module's parameters as a plain tree of arrays (or ShapeDtypeStructs), release names."""
    return nest({path: p.get_value() for path, p in iter_params(module)})


def declarations(module: nnx.Module):
    """The module's ``ParamInfo``s, in the tree ``pure`` gives."""
    return nest({path: p.get_metadata()["info"] for path, p in iter_params(module)})


def path_keys(keypath) -> tuple:
    """A jax key path -> a tuple of str keys and int indices (the form ``info_at`` takes)."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        else:
            out.append(str(k))
    return tuple(out)


def is_weight(x) -> bool:
    """A parameter's value: an array or anything shaped like one (``ShapeDtypeStruct``, ``ParamInfo``,
    ``v4jax.quant``'s ``Quantized`` and ``BlockScaled``, which are pytrees of their parts)."""
    return hasattr(x, "shape")
