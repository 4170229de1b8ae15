"""Training checkpoints with Orbax's CheckpointManager.

A checkpoint step holds three items:

* ``state``: the train state pytree (params with the router biases, optimizer state, step);
* ``data``: the data iterator's state, one JSON file per process (``process_I-of-N.json``, grain's
  layout): each host of a multi-host run reads its own share of the data and resumes it;
* ``meta``: the model config (HF config.json style) and the train/data config (JSON).

Orbax writes each step into a temporary directory and renames it when every item is complete, so an
interrupted save never leaves a step that looks finished. Saves are asynchronous: training goes on
while the files are written; ``wait()`` blocks until they are.

A state with an inf or nan is never saved, and a restored one is checked too: a step whose files are
missing, truncated or garbled, or whose values are not finite, is broken (``CheckpointError``). By
default ``restore`` falls back from a broken step to the newest one that restores, with a warning.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from v4jax.config import ConfigError, ModelConfig
from v4jax.convert.safetensors_io import CheckpointError  # one error type for every unusable checkpoint
from v4jax.multihost import barrier, is_writer, on_every_process


class Checkpointer:
    """Save every ``every`` steps, keep the last ``keep``; restore the newest step that restores."""

    def __init__(self, directory: str | Path, keep: int = 3, every: int = 1, async_save: bool = True):
        self.directory = Path(directory).absolute()
        # create=False: the first save makes the directory, so a run (or a reader) that stops before
        # saving leaves nothing behind
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=False,
                                               enable_async_checkpointing=async_save)
        # every process writes its own data state; Orbax's JSON handler writes on "primary" hosts only
        data = ocp.JsonCheckpointHandler(
            f"process_{jax.process_index()}-of-{jax.process_count()}.json",
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": data, "meta": ocp.JsonCheckpointHandler()})
        self.skipped: list[Path] = []  # the broken step directories the last restore passed over

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        if not bool(_finite(state)):
            raise ValueError(f"step {step}: the train state holds inf or nan; it is not saved")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, target, step: int | None = None, data: bool = True) -> tuple[Any, dict | None, dict]:
        """(state, data_state, meta) of ``step``, or with no ``step`` of the newest step that restores.
        ``data=False`` leaves this process's data state out (None): what inference needs, with any
        number of processes.

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
            return self._restore(step, target, data)
        self.skipped = []
        for s in steps:
            try:
                return self._restore(s, target, data)
            except CheckpointError as e:
                warnings.warn(f"{e}; skipped, trying the step before", stacklevel=2)
                self.skipped.append(self.directory / str(s))
        raise CheckpointError(f"no checkpoint in {self.directory} can be restored (the warnings above say why): "
                              "move its broken step directories away, or remove the directory to start afresh")

    def set_aside_skipped(self) -> None:
        """Rename the broken steps the last restore skipped to ``STEP.broken`` (a name Orbax ignores),
        with a warning. A run resumed from an older step saves those step numbers again, and Orbax
        neither overwrites a step nor saves one below its newest."""
        if is_writer():
            for path in self.skipped:
                dest = path.with_name(f"{path.name}.broken")
                if dest.exists():  # this step broke before: keep both
                    dest = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(dest)
                warnings.warn(f"renamed the broken checkpoint {path} to {dest.name}: delete it once you no longer "
                              "need it", stacklevel=2)
        barrier("v4jax checkpoint set aside")
        self.manager.reload()
        self.skipped = []

    def _restore(self, step: int, target, with_data: bool):
        meta = self._read(step, meta=ocp.args.JsonRestore()).meta
        items = {"state": ocp.args.StandardRestore(target(meta) if callable(target) else target),
                 "meta": ocp.args.JsonRestore()}
        data_dir, data = self.directory / str(step) / "data", None
        if with_data and (data_dir / "metadata").exists() and jax.process_count() == 1:
            data = json.loads((data_dir / "metadata").read_text())  # saved before the data states were per process
        elif with_data:
            _check_processes(data_dir)
            items["data"] = ocp.args.JsonRestore()
        out = self._read(step, **items)
        # A flipped bit can make a valid float inf or nan; training on from it would only fail later.
        if not bool(_finite(out.state)):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} holds inf or nan values")
        return out.state, out.get("data", data), out.meta

    def _read(self, step: int, **items):
        """Orbax's restore of some items, a broken step's many error types (TensorStore's ValueError,
        KeyError, JSONDecodeError, ...) turned into one CheckpointError with the first line of the cause."""
        try:
            out, problem = self.manager.restore(step, args=ocp.args.Composite(**items)), None
        except Exception as e:  # noqa: BLE001 -- whatever broke, the step is unusable
            out, problem = None, (str(e).splitlines() or [type(e).__name__])[0][:300]
        if not on_every_process(problem is None):  # multi-host: one process's bad read breaks the step for all
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


def _check_processes(data_dir: Path) -> None:
    """A step's data states are one per process of the run that saved it; a run with another number
    of processes splits the data otherwise and cannot go on from them (ConfigError)."""
    counts = {int(m.group(1)) for p in (data_dir.iterdir() if data_dir.is_dir() else ())
              if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))}
    if (data_dir / "metadata").exists():
        counts.add(1)
    if counts and counts != {jax.process_count()}:
        saved = " or ".join(str(n) for n in sorted(counts))
        raise ConfigError(f"{data_dir.parent} was saved by a run of {saved} process(es) and this one has "
                          f"{jax.process_count()}: each process's data position is in the checkpoint, and the data is "
                          f"split by the number of processes; resume with {saved} process(es) (JAX_NUM_PROCESSES, or "
                          "the same number of hosts)")


def abstract(tree):
    """ShapeDtypeStructs (with shardings where the arrays have them) of a pytree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def model_config_from_meta(meta: dict) -> ModelConfig:
    return ModelConfig.from_dict(meta["model"])


def scan_layers_from_meta(meta: dict) -> bool:
    """Whether the saved parameters are in the scan layout (checkpoints from before
    ``parallel.scan_layers`` existed hold the per-layer layout)."""
    return bool(meta.get("parallel", {}).get("scan_layers", False))
