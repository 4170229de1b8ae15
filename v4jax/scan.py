"""Scanned layers: runs of identical decoder layers stacked and run with ``jax.lax.scan``.

XLA then compiles one loop body per kind of layer instead of one copy per layer, so the compile
time of a deep model stops growing with its depth.

Two layers can share a loop body when they have the same *signature*: the same attention kind (SWA,
CSA or HCA) and the same router (hash-routed or learned), and neither has Engram (an Engram layer is
a stage of its own). ``plan`` splits the L main layers into
*stages*. A stage is ``repeats`` copies of a unit of ``period`` consecutive layers. V4-Flash gives
three stages: the two hash-routed SWA layers, the hash-routed CSA layer 2, and (HCA, CSA) x 20 for
layers 3..42. The MTP block is never scanned. ``run_stages`` may unroll the short stages
(``parallel.unroll_stages``) on the same layout: a loop's per-stage residual stacks cost more than
compiling a few more layers.

Scan layout of the parameter tree: ``params["layers"]`` (a list of L layer trees) becomes
``params["stages"]``. That is one entry per stage, each a list of ``period`` layer trees whose
leaves have a leading axis of length ``repeats``. Layer ``start + k*period + j`` is
``stages[s][j]`` at index k. ``stack_layers`` and ``unstack_layers`` convert between the two
layouts. ``v4jax.model.forward`` runs either layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from v4jax.config import ModelConfig
from v4jax.params import ParamInfo

MAX_PERIOD = 4  # longest unit searched for (V4 needs 2)


@dataclasses.dataclass(frozen=True)
class Stage:
    start: int  # first layer
    period: int  # layers per unit
    repeats: int  # units stacked

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    def layer_ids(self, j: int) -> range:
        """The layers at position j of the unit, in scan order."""
        return range(self.start + j, self.stop, self.period)


def layer_signature(config: ModelConfig, layer: int) -> tuple:
    """Attention kind, hash routing, and for an Engram layer its own id (each is a stage of its own:
    it reads its own slice of the batch's Engram rows)."""
    engram = layer if config.engram is not None and layer in config.engram.layers else None
    return config.layer_type(layer), layer < config.num_hash_layers, engram


def plan(config: ModelConfig) -> tuple[Stage, ...]:
    """Split the main layers into stages, greedily from the first layer: at each layer take the unit
    (period 1..MAX_PERIOD) whose repeats cover the most layers (the shorter unit on a tie); a layer
    that starts no repeat is a stage of its own."""
    sig = [layer_signature(config, i) for i in range(config.num_hidden_layers)]
    stages, i = [], 0
    while i < len(sig):
        best = Stage(i, 1, 1)
        for period in range(1, MAX_PERIOD + 1):
            unit = sig[i:i + period]
            if len(unit) < period:
                break
            repeats = 1
            while sig[i + repeats * period:i + (repeats + 1) * period] == unit:
                repeats += 1
            if repeats > 1 and period * repeats > best.period * best.repeats:
                best = Stage(i, period, repeats)
        stages.append(best)
        i = best.stop
    return tuple(stages)


def _stack(trees):
    def one(*leaves):
        if isinstance(leaves[0], jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)
        if isinstance(leaves[0], ParamInfo):  # layers of one signature have one declaration
            return leaves[0].stacked(len(leaves))
        return jnp.stack(leaves)

    return jax.tree.map(one, *trees)


def stack_layers(params: dict, config: ModelConfig) -> dict:
    """The scan layout of a parameter tree (arrays, ShapeDtypeStructs or ParamInfos); unchanged if
    already so."""
    if "stages" in params:
        return params
    layers = params["layers"]
    stages = [[_stack([layers[i] for i in st.layer_ids(j)]) for j in range(st.period)] for st in plan(config)]
    out = {k: v for k, v in params.items() if k != "layers"}
    out["stages"] = stages
    return out


def _per_layer(stages, config: ModelConfig) -> list:
    """Stacked trees, one list of ``period`` trees per stage -> the L per-layer trees, in layer order."""
    layers: list = [None] * config.num_hidden_layers
    for st, slots in zip(plan(config), stages, strict=True):
        for j, tree in enumerate(slots):
            for k, i in enumerate(st.layer_ids(j)):
                layers[i] = jax.tree.map(lambda a, k=k: a[k], tree)
    return layers


def unstack_layers(params: dict, config: ModelConfig) -> dict:
    """The per-layer list layout of a parameter tree (arrays); unchanged if already so."""
    if "stages" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "stages"}
    out["layers"] = _per_layer(params["stages"], config)
    return out


def run_stages(x, stages, config: ModelConfig, layer_fn, unroll_up_to: int = 0):
    """Run every stage with ``lax.scan``. ``layer_fn(layer, looped)`` gives ``f(x, p) -> (x, info)``
    for that layer (only its signature may matter: one function serves all repeats); ``looped``
    says whether it runs inside a loop. A stage of at most ``unroll_up_to`` repeats is unrolled
    (``unroll=True``: straight-line code, no loop): its parameters keep the stacked layout, but the
    residuals of its layers are no longer written into per-stage stacks and sliced back out in the
    backward pass, and each of its layers is compiled. Returns x and the list of the L layers'
    infos, unstacked."""
    stacked_infos = []
    for st, slots in zip(plan(config), stages, strict=True):
        unrolled = st.repeats <= unroll_up_to
        fns = [layer_fn(st.start + j, not unrolled) for j in range(st.period)]

        def unit(x, ps, fns=fns):
            outs = []
            for fn, p in zip(fns, ps):
                x, info = fn(x, p)
                outs.append(info)
            return x, outs

        x, outs = jax.lax.scan(unit, x, slots, unroll=True if unrolled else 1)
        stacked_infos.append(outs)
    return x, _per_layer(stacked_infos, config)
