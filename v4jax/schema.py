"""The model-wide parameter schema: every parameter's declaration (``v4jax.params.ParamInfo``)
by its path, and what is derived from the declarations for a whole model.

* ``info_at`` / ``infos`` / ``tree_infos``: the declaration at a path, of a config's tree, of every
  weight of a parameter-shaped tree (either layout: ``layers`` or the scan layout's ``stages``).
* ``param_shardings`` / ``shard_like_params``: where each parameter lives on a mesh, from its
  logical axes under ``v4jax.parallel``'s rules.
* ``for_training`` / ``as_stored``: the parameters with the weights the release stores in FP8/FP4
  wrapped for ``train.precision`` or held in those formats (``v4jax.quant``).

It sits above the model (it reads the declarations off ``v4jax.model.Transformer``), so the modules
below it (params, parallel, quant and the layers) import nothing from above.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec

from v4jax.model import Transformer
from v4jax.parallel import DEFAULT_RULES, ShardingError, spec_for, validate_rules
from v4jax.params import ParamInfo, is_weight, iter_params, nest, path_keys
from v4jax.quant import PRECISIONS, BlockScaled, IndexerQK, Quantized, block_scaled, weight
from v4jax.scan import plan, stack_layers

# --------------------------------------------------------------------------------------------------
# Declarations by path


@functools.lru_cache(maxsize=32)
def _flat_infos(config) -> dict:
    return {path: p.get_metadata()["info"] for path, p in iter_params(Transformer(config, None))}


def _stage_info(config, path: tuple) -> ParamInfo | None:
    stages = plan(config)
    if len(path) < 3 or not isinstance(path[1], int) or path[1] >= len(stages):
        return None
    stage = stages[path[1]]
    info = _flat_infos(config).get(("layers", stage.start + path[2]) + tuple(path[3:]))
    return None if info is None else info.stacked(stage.repeats)


def info_at(config, path: tuple) -> ParamInfo | None:
    """The declaration of the parameter at ``path`` (str keys and int indices), in either layout;
    None for a path that is no parameter of this config."""
    path = tuple(path)
    if path[:1] == ("stages",):
        return _stage_info(config, path)
    return _flat_infos(config).get(path)


def infos(config, scan: bool = False):
    """The tree of ``ParamInfo``s of a config's parameters (``scan``: in the scan layout)."""
    tree = nest(_flat_infos(config))
    return stack_layers(tree, config) if scan else tree


def tree_infos(config, tree):
    """The declaration of every weight (``is_weight``) of a parameter-shaped tree (params, gradients,
    specs; either layout; a subtree of the parameters too). A weight that is no parameter raises,
    naming it."""

    def one(keypath, leaf):
        info = info_at(config, path_keys(keypath))
        shape = tuple(leaf.shape)
        if info is None or info.shape != shape:
            raise ValueError(f"{jax.tree_util.keystr(keypath)} {shape} is not a parameter of this config"
                             + ("" if info is None else f" (declared {info.shape})"))
        return info

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_weight)


# --------------------------------------------------------------------------------------------------
# Placement on a mesh


def check_rule_axes(rules, params, config) -> None:
    """No parameter's logical axes put one mesh axis on two of its dimensions under ``rules``
    (checked for every weight, all problems reported); the rules themselves as
    ``v4jax.parallel.validate_rules``."""
    validate_rules(rules)
    problems = []
    for path, info in jax.tree_util.tree_flatten_with_path(tree_infos(config, params))[0]:
        seen: dict[str, str] = {}
        for name in info.axes:
            for axis in rules.get(name, ()) if name else ():
                if axis in seen and seen[axis] != name:
                    problems.append(f"{jax.tree_util.keystr(path)} {info.axes}: {seen[axis]!r} and {name!r} "
                                    f"both on mesh axis {axis!r}")
                seen[axis] = name
    if problems:
        raise ShardingError("the rules put two logical axes on one mesh axis:\n  " + "\n  ".join(problems))


def param_shardings(params, mesh: jax.sharding.Mesh, config, rules=DEFAULT_RULES):
    """NamedSharding of every parameter (arrays or ShapeDtypeStructs, either layout, or a subtree),
    from its declared logical axes (``v4jax.params``) under the rules."""
    check_rule_axes(rules, params, config)

    def one(w, info):
        place = lambda shape: NamedSharding(mesh, spec_for(info.axes, shape, mesh, rules))  # noqa: E731
        if isinstance(w, BlockScaled):  # codes and scales have the weight's axes (blocks of them)
            return BlockScaled(place(w.codes.shape), place(w.scales.shape), w.fmt)
        return place(info.shape)

    return jax.tree.map(one, params, tree_infos(config, params), is_leaf=is_weight)


def shard_like_params(tree, params, mesh, config, rules=DEFAULT_RULES):
    """Shardings for a tree that contains parameter-shaped leaves (e.g. optimizer state): a leaf
    whose path ends like a parameter's path and has its shape gets that parameter's sharding;
    everything else is replicated."""
    by_path = {path_keys(p): sh for p, sh in jax.tree_util.tree_flatten_with_path(
        param_shardings(params, mesh, config, rules))[0]}
    shapes = {path_keys(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        names = path_keys(path)
        for k in range(len(names)):
            key = names[k:]
            if key in by_path and shapes[key] == tuple(getattr(leaf, "shape", ())):
                return by_path[key]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


# --------------------------------------------------------------------------------------------------
# The release's FP8/FP4 weights: for training, as stored


def for_training(params, config, precision: str, indexer_fp4: bool = False):
    """The parameters of ``config`` as a training step with ``precision`` uses them, each weight's
    format read from its declaration (``tree_infos``, only when something is
    quantised). "bf16": unchanged. "fp8": every weight the release stores in FP8 (export "fp8") and
    the routed experts become ``Quantized`` FP8; the attention's ``wo_a``, stored in FP8 but
    multiplied in bf16 by V4, has only its weight quantised. "fp8+fp4qat": the same with the routed
    experts in FP4 (quantisation-aware training). ``indexer_fp4``: every lightning indexer gets the
    ``IndexerQK`` marker (its queries and keys in FP4 after a Hadamard rotation)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: one of {', '.join(PRECISIONS)}")
    if precision != "bf16":
        params = jax.tree_util.tree_map_with_path(functools.partial(_wrap, precision), params,
                                                  tree_infos(config, params))
    return _mark_indexers(params) if indexer_fp4 else params


def _wrap(precision: str, path, w, info):
    if info.export == "experts":
        return Quantized(w, "fp4" if precision == "fp8+fp4qat" else "fp8")
    if info.export != "fp8":
        return w
    if getattr(path[-1], "key", None) == "wo_a":
        return weight(w, "fp8")
    return Quantized(w, "fp8")


def _mark_indexers(tree):
    """A copy of the parameter dicts with ``qk: IndexerQK("fp4")`` in every ``indexer`` dict."""
    if isinstance(tree, dict):
        out = {k: _mark_indexers(v) for k, v in tree.items()}
        return {**out, "qk": IndexerQK("fp4")} if "wq_b" in tree and "weights_proj" in tree else out
    if isinstance(tree, (list, tuple)):
        return type(tree)(_mark_indexers(v) for v in tree)
    return tree


def as_stored(params, config, experts: str = "fp4"):
    """``params`` with the weights the release stores quantised held so (``BlockScaled``): every
    weight declared ``export="fp8"`` in FP8, the routed experts in ``experts`` ("fp4" as released,
    or "fp8"). For a model that was not loaded from such files (``block_scaled`` rounds its values)."""
    formats = {"fp8": "fp8", "experts": experts}
    return jax.tree.map(lambda w, info: block_scaled(w, formats[info.export]) if info.export in formats else w,
                        params, tree_infos(config, params))
