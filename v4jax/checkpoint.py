"""Training checkpoints with Orbax's CheckpointManager.

A checkpoint step holds three items:

* ``state``: the train state pytree (params with the router biases, optimizer state, step);
* ``data``: the data iterator's state (JSON), so a resumed run sees the same next batches;
* ``meta``: the model config (HF config.json style) and the train/data config (JSON).

Orbax writes each step into a temporary directory and renames it when every item is complete, so an
interrupted save never leaves a step that looks finished. Saves are asynchronous: training goes on
while the files are written; ``wait()`` blocks until they are.

A state with an inf or nan is never saved, and a restored one is checked too: a step whose files are
missing, truncated or garbled, or whose values are not finite, is broken (``CheckpointError``). By
default ``restore`` falls back from a broken step to the newest one that restores, with a warning.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from v4jax.config import ModelConfig
from v4jax.convert.safetensors_io import CheckpointError  # one error type for every unusable checkpoint


class Checkpointer:
    """Save every ``every`` steps, keep the last ``keep``; restore the newest step that restores."""

    def __init__(self, directory: str | Path, keep: int = 3, every: int = 1, async_save: bool = True):
        self.directory = Path(directory).absolute()
        # create=False: the first save makes the directory, so a run (or a reader) that stops before
        # saving leaves nothing behind
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=False,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))
        self.skipped: list[Path] = []  # the broken step directories the last restore passed over

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        if not bool(_finite(state)):
            raise ValueError(f"step {step}: the train state holds inf or nan; it is not saved")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, target, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step``, or with no ``step`` of the newest step that restores.

        ``target`` gives the structure, dtypes and shardings to restore into: an abstract state
        (e.g. from ``jax.eval_shape``) or a function from the step's ``meta`` to one (which may raise
        to refuse the checkpoint, e.g. a ConfigError for another run's). A broken ``step`` raises
        CheckpointError; with no ``step``, each broken step is skipped with a warning naming its
        directory (listed in ``self.skipped``), and CheckpointError comes only when none restores.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no step {step} in {self.directory} (steps: {sorted(steps)})")
            return self._restore(step, target)
        self.skipped = []
        for s in steps:
            try:
                return self._restore(s, target)
            except CheckpointError as e:
                warnings.warn(f"{e}; skipped, trying the step before", stacklevel=2)
                self.skipped.append(self.directory / str(s))
        raise CheckpointError(f"no checkpoint in {self.directory} can be restored (the warnings above say why): "
                              "move its broken step directories away, or remove the directory to start afresh")

    def set_aside_skipped(self) -> None:
        """Rename the broken steps the last restore skipped to ``STEP.broken`` (a name Orbax ignores),
        with a warning. A run resumed from an older step saves those step numbers again, and Orbax
        neither overwrites a step nor saves one below its newest."""
        if jax.process_index() == 0:
            for path in self.skipped:
                dest = path.with_name(f"{path.name}.broken")
                if dest.exists():  # this step broke before: keep both
                    dest = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(dest)
                warnings.warn(f"renamed the broken checkpoint {path} to {dest.name}: delete it once you no longer "
                              "need it", stacklevel=2)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("v4jax checkpoint set aside")
        self.manager.reload()
        self.skipped = []

    def _restore(self, step: int, target):
        meta = self._read(step, meta=ocp.args.JsonRestore()).meta
        abstract_state = target(meta) if callable(target) else target
        out = self._read(step, state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                         meta=ocp.args.JsonRestore())
        # A flipped bit can make a valid float inf or nan; training on from it would only fail later.
        if not bool(_finite(out.state)):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} holds inf or nan values")
        return out.state, out.data, out.meta

    def _read(self, step: int, **items):
        """Orbax's restore of some items, a broken step's many error types (TensorStore's ValueError,
        KeyError, JSONDecodeError, ...) turned into one CheckpointError with the first line of the cause."""
        try:
            out, problem = self.manager.restore(step, args=ocp.args.Composite(**items)), None
        except Exception as e:  # noqa: BLE001 -- whatever broke, the step is unusable
            out, problem = None, (str(e).splitlines() or [type(e).__name__])[0][:300]
        if not _on_every_process(problem is None):  # multi-host: one process's bad read breaks the step for all
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read: "
                                  f"{problem or 'failed on another process'}")
        return out

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def all_finite(tree) -> jax.Array:
    """A scalar bool: no float leaf of ``tree`` holds inf or nan (under jit: one fused pass over it)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


_finite = jax.jit(all_finite)


def _on_every_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def abstract(tree):
    """ShapeDtypeStructs (with shardings where the arrays have them) of a pytree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def model_config_from_meta(meta: dict) -> ModelConfig:
    return ModelConfig.from_dict(meta["model"])


def scan_layers_from_meta(meta: dict) -> bool:
    """Whether the saved parameters are in the scan layout (checkpoints from before
    ``parallel.scan_layers`` existed hold the per-layer layout)."""
    return bool(meta.get("parallel", {}).get("scan_layers", False))
