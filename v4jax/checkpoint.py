"""Training checkpoints with Orbax's CheckpointManager.

A checkpoint step holds three items:

* ``state``: the train state pytree (params with the router biases, optimizer state, step);
* ``data``: the data iterator's state (JSON), so a resumed run sees the same next batches;
* ``meta``: the model config (HF config.json style) and the train/data config (JSON).

Orbax writes each step into a temporary directory and renames it when every item is complete, so an
interrupted save never leaves a step that looks finished. Saves are asynchronous: training goes on
while the files are written; ``wait()`` blocks until they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from v4jax.config import ModelConfig


class Checkpointer:
    """Save every ``every`` steps, keep the last ``keep``; restore the latest."""

    def __init__(self, directory: str | Path, keep: int = 3, every: int = 1, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, meta) of ``step`` (default: the latest) into the structure,
        dtypes and shardings of ``abstract_state`` (e.g. from ``jax.eval_shape``)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out.state, out.data, out.meta

    def read_meta(self, step: int | None = None) -> dict | None:
        """The ``meta`` item of a step, without touching the (large) state."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract(tree):
    """ShapeDtypeStructs (with shardings where the arrays have them) of a pytree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def model_config_from_meta(meta: dict) -> ModelConfig:
    return ModelConfig.from_dict(meta["model"])


def scan_layers_from_meta(meta: dict) -> bool:
    """Whether the saved parameters are in the scan layout (checkpoints from before
    ``parallel.scan_layers`` existed hold the per-layer layout)."""
    return bool(meta.get("parallel", {}).get("scan_layers", False))
