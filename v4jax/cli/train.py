"""Train a DeepSeek-V4 model (``python train.py`` or ``v4jax-train``).

    python train.py [--config configs/tiny.yaml] [--workdir runs/tiny] [section.key=value ...]

With no arguments it trains the tiny config on the bundled corpus on CPU (run from the repository,
whose configs/ and data/ the defaults name). If the workdir holds a checkpoint, training resumes
from it (same model and data settings required). Writes ``WORKDIR/metrics.jsonl`` (one JSON object
per logged step), TensorBoard events under ``WORKDIR/tb``, checkpoints under
``WORKDIR/checkpoints`` and the resolved config in ``WORKDIR/config.json``. SIGINT/SIGTERM save a
checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="v4jax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML file with model/train/data sections")
    p.add_argument("--workdir", default=None, help="output and checkpoint directory (default: runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--stop-after-step", type=int, default=None, metavar="N",
                   help="save and stop after step N (split a run into jobs; the same command resumes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 model.hidden_size=128")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from v4jax.config import ConfigError
    from v4jax.parallel import ShardingError, initialize_distributed, make_mesh
    from v4jax.trainer import load_run_config

    initialize_distributed()  # multi-host jobs: from the environment (see README); a no-op otherwise
    workdir = None
    try:  # everything is validated before the workdir is touched
        run = load_run_config(args.config, args.overrides)
        workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
        check_run(run, workdir)
        mesh = make_mesh(run.parallel)
        check_batch_split(run, mesh)
    except (ConfigError, ShardingError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from v4jax.data import make_dataset
    from v4jax.engram import hasher_for

    data = make_dataset(run.data, hasher=hasher_for(run.model))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2))
    state, checkpointer = initial_state(run, mesh, workdir / "checkpoints", data)
    try:
        return Trainer(run, mesh, data, checkpointer, workdir, args).run(state)
    finally:
        checkpointer.wait()
        checkpointer.close()


# --------------------------------------------------------------------------------------------------
# Checks (before anything is written)


def check_run(run, workdir: Path) -> None:
    """A checkpoint in the workdir must be of this run; the vocabulary must hold the tokenizer's."""
    from v4jax.checkpoint import Checkpointer, model_config_from_meta, scan_layers_from_meta
    from v4jax.config import ConfigError

    ckpt_dir = workdir / "checkpoints"
    saved = Checkpointer(ckpt_dir, run.train.keep_checkpoints).read_meta() if ckpt_dir.exists() else None
    if saved is not None:
        problem = None
        if model_config_from_meta(saved) != run.model:
            problem = "its model config differs"
        elif scan_layers_from_meta(saved) != run.parallel.scan_layers:
            problem = (f"parallel.scan_layers differs: saved {scan_layers_from_meta(saved)}, now "
                       f"{run.parallel.scan_layers}; the parameter layouts differ, so set it as saved")
        for key in ("tokenizer", "seq_len", "batch_size", "path", "seed"):
            if problem is None and saved["data"].get(key) != getattr(run.data, key):
                problem = f"data.{key} differs: saved {saved['data'].get(key)!r}, now {getattr(run.data, key)!r}"
        if problem:
            raise ConfigError(f"{workdir} holds a checkpoint of another run ({problem}); use another --workdir")
    engram = run.model.engram
    if engram is not None and engram.tokenizer not in (run.data.tokenizer, "none"):
        raise ConfigError(f"model.engram.tokenizer={engram.tokenizer!r} must be the data's tokenizer "
                          f"({run.data.tokenizer!r}) or 'none': it compresses that tokenizer's ids")
    if run.data.seq_len < 2 or run.model.vocab_size < (259 if run.data.tokenizer == "bytes" else 129280):
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} is smaller than the {run.data.tokenizer} "
                          "tokenizer's vocabulary")


def check_batch_split(run, mesh) -> None:
    from v4jax.config import ConfigError
    from v4jax.parallel import DEFAULT_RULES

    split = int(np.prod([mesh.shape[a] for a in DEFAULT_RULES["batch"]]))
    if run.data.batch_size % split:
        raise ConfigError(f"data.batch_size={run.data.batch_size} must be divisible by the {split} devices that "
                          "split the batch (parallel.data x fsdp x expert)")


# --------------------------------------------------------------------------------------------------
# State


def initial_state(run, mesh, ckpt_dir: Path, data):
    """A fresh sharded train state, or the latest checkpoint's (the data iterator resumes with it)."""
    from v4jax.checkpoint import Checkpointer, abstract
    from v4jax.model import init_params
    from v4jax.parallel import param_shardings, shard_like_params
    from v4jax.trainer import init_state, make_optimizer

    config, cfg = run.model, run.train
    params = init_params(config, cfg.seed, scan=run.parallel.scan_layers)
    params = jax.device_put(params, param_shardings(params, mesh, config))
    state = init_state(params, make_optimizer(cfg, config))
    state = jax.device_put(state, shard_like_params(state, params, mesh, config))
    checkpointer = Checkpointer(ckpt_dir, cfg.keep_checkpoints, cfg.checkpoint_every)
    if checkpointer.latest_step() is not None:
        state, data_state, _ = checkpointer.restore(abstract(state))
        data.set_state(data_state)
        print(f"resumed from step {int(state['step'])} in {ckpt_dir}", file=sys.stderr)
    return state, checkpointer


# --------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Runs the steps from the state's step to ``train.steps``: logging, held-out evaluation,
    checkpoints, and a save on SIGINT/SIGTERM or ``--stop-after-step``. ``run`` returns the exit
    status: 0, 1 after ``train.max_bad_steps`` non-finite steps in a row, 128 + signal."""

    def __init__(self, run, mesh, data, checkpointer, workdir: Path, args):
        from v4jax.parallel import batch_sharding
        from v4jax.trainer import flops_per_token, make_eval_step, make_optimizer, make_train_step, peak_flops

        self.run_cfg, self.cfg, self.data, self.checkpointer = run, run.train, data, checkpointer
        self.workdir, self.args = workdir, args
        self.step_fn = make_train_step(run.model, self.cfg, make_optimizer(self.cfg, run.model), run.parallel, mesh)
        self.eval_fn = make_eval_step(run.model, parallel=run.parallel, mesh=mesh) if self.cfg.eval_every else None
        sharding = batch_sharding(mesh)
        self.to_global = lambda b: {k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}
        self.tokens_per_step = run.data.batch_size * run.data.seq_len
        self.flops_per_token = flops_per_token(run.model, run.data.seq_len)
        self.peak = peak_flops(self.cfg)
        self.meta = run.to_dict()
        self.signal = None
        self.saved = None  # the step last saved

    def run(self, state) -> int:
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        start, status, bad = int(state["step"]), 0, 0
        bar = tqdm(total=self.cfg.steps, initial=start, disable=self.args.no_progress, unit="step", dynamic_ncols=True)
        window = {"t0": time.perf_counter(), "tokens": 0}
        with self._signals(), SummaryWriter(str(self.workdir / "tb")) as writer, \
                (self.workdir / "metrics.jsonl").open("a") as log:
            try:
                for step in range(start, self.cfg.steps):
                    state, metrics = self.step_fn(state, self.to_global(next(self.data)))
                    window["tokens"] += self.tokens_per_step
                    done = step + 1
                    bad = 0 if bool(metrics["ok"]) else bad + 1
                    if bad:
                        print(f"step {done}: loss or gradient not finite; step skipped ({bad} in a row)",
                              file=sys.stderr)
                        if bad >= self.cfg.max_bad_steps:
                            print(f"stopping after {bad} bad steps in a row; the last good checkpoint is kept",
                                  file=sys.stderr)
                            return 1
                    if done % self.cfg.log_every == 0 or done == self.cfg.steps:
                        self._log(done, metrics, state, window, log, writer, bar)
                    bar.update(1)
                    if bad == 0 and done % self.cfg.checkpoint_every == 0:
                        self._save(done, state)
                    if self.signal is not None or done == self.args.stop_after_step:
                        why = f"signal {self.signal}" if self.signal is not None else "--stop-after-step"
                        print(f"{why}: saving step {done} and stopping", file=sys.stderr)
                        if bad == 0:
                            self._save(done, state, force=True)
                        return 0 if self.signal is None else 128 + self.signal
                if start < self.cfg.steps and bad == 0:
                    self._save(self.cfg.steps, state, force=True)
            finally:
                bar.close()
        return status

    def _save(self, step: int, state, force: bool = False) -> None:
        if self.saved != step:
            self.checkpointer.save(step, state, self.data.get_state(), self.meta, force=force)
            self.saved = step

    def _log(self, done, metrics, state, window, log, writer, bar) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tps = window["tokens"] / (time.perf_counter() - window["t0"])
        m.update(step=done, tokens_per_s=tps, mfu=self.flops_per_token * tps / self.peak, time=time.time())
        if self.eval_fn is not None and done % self.cfg.eval_every == 0:
            m.update(self._evaluate(state["params"]))
        log.write(json.dumps(m) + "\n")
        log.flush()
        for k, v in m.items():
            if isinstance(v, float) and math.isfinite(v) and k not in ("step", "time"):
                writer.add_scalar(k, v, done)
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{m['mfu']:.1%}")
        window.update(t0=time.perf_counter(), tokens=0)

    def _evaluate(self, params) -> dict:
        """Held-out losses over a fixed number of batches (the same count on every host)."""
        from v4jax.data import make_dataset
        from v4jax.engram import hasher_for
        from v4jax.trainer import evaluate

        it = make_dataset(dataclasses.replace(self.run_cfg.data.for_eval(), num_epochs=None),
                          hasher=hasher_for(self.run_cfg.model))
        batches = (self.to_global(b) for _, b in zip(range(self.cfg.eval_batches), it))
        return {f"eval_{head}_loss": r["loss"] for head, r in evaluate(self.eval_fn, params, batches).items()}

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM set a flag; the loop saves and stops after the step in flight."""

        def on_signal(signum, _frame):
            self.signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
