"""Train a DeepSeek-V4 model (``python train.py`` or ``v4jax-train``).

    python train.py [--config configs/tiny.yaml] [--workdir runs/tiny] [section.key=value ...]

With no arguments it trains the tiny config on the bundled corpus on CPU (run from the repository,
whose configs/ and data/ the defaults name). If the workdir holds a checkpoint, training resumes
from it (same model and data settings required). Writes ``WORKDIR/metrics.jsonl`` (one JSON object
per logged step), TensorBoard events under ``WORKDIR/tb``, checkpoints under
``WORKDIR/checkpoints`` and the resolved config in ``WORKDIR/config.json``. SIGINT/SIGTERM save a
checkpoint before exiting.

One run at a time uses a workdir: ``WORKDIR/train.lock`` names the run holding it (host, pid, start
time) and a second run is refused. A lock left by a run that died on this host is taken over with a
warning; one from another host cannot be checked from here, so the error says how to remove it.

On resume, training starts from the newest checkpoint that restores: a broken newer step (files
missing or garbled, values not finite) is named in a warning and renamed ``STEP.broken``, so that
its step can be saved again. ``metrics.jsonl`` keeps its lines up to the restored step: lines of
later steps (a killed run logs past its last checkpoint) are dropped, as the resumed run logs those
steps again. A run with no checkpoint starts the log afresh, for the same reason.

A local corpus (``data.path``: .txt/.jsonl/.parquet files, a directory or a glob; docs/data.md)
holds out about 5% of its documents for evaluation unless ``data.heldout_fraction`` is set
(``v4jax.data.resolve_heldout_fraction`` says why); the fraction is kept with the run, and a
resumed run goes on with it. Every setting is checked before the first step, the held-out split
too when ``train.eval_every`` > 0, so a run cannot fail at its first evaluation.

At the end (done, ``--stop-after-step``, a signal or bad steps) a short summary goes to stderr:
the steps, the last training and held-out losses of the main head, the checkpoint and where the
metrics are, and the commands that come next.

Exit status: 0 when done or stopped by ``--stop-after-step``; 1 after ``train.max_bad_steps``
steps in a row with a non-finite loss or gradient, or at once after a step whose new state is not
finite (v4jax.trainer); 2 with one ``error:`` line for a bad config, data or checkpoint, a
workdir in use, or an OS error (read-only workdir, full disk); 128 + N after signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

# jax and the rest of v4jax are imported inside the functions: --help then takes a tenth of a second.


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="v4jax-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML file with model/train/data sections")
    p.add_argument("--workdir", default=None, help="output and checkpoint directory (default: runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--stop-after-step", type=int, default=None, metavar="N",
                   help="save and stop after step N (split a run into jobs; the same command resumes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 model.hidden_size=128")
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    from v4jax.checkpoint import CheckpointError
    from v4jax.config import ConfigError
    from v4jax.data import DataError
    from v4jax.parallel import ShardingError, initialize_distributed, make_mesh
    from v4jax.trainer import load_run_config
    from v4jax.workdir import LockError, workdir_lock

    initialize_distributed()  # multi-host jobs: from the environment (see README); a no-op otherwise
    try:  # the config is checked before the workdir is touched
        run = load_run_config(args.config, args.overrides)
        workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
        check_local_paths(args.workdir, run.data.path)
        check_config(run)
        mesh = make_mesh(run.parallel)
        check_batch_split(run, mesh)
    except (ConfigError, ShardingError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            with workdir_lock(workdir):
                return train(run, mesh, workdir, args)
        except (LockError, ConfigError, ShardingError, DataError, CheckpointError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:  # read-only workdir, full disk, missing data file: no traceback for these
            where = f" (workdir {workdir})" if e.errno is not None and e.filename is None else ""
            print(f"error: {e}{where}", file=sys.stderr)
    return 2


def train(run, mesh, workdir: Path, args) -> int:
    """Everything after the lock: data, state (fresh or restored), logs, the loop, the summary.
    Whatever fails on the user's input (data files, another run's or only broken checkpoints) fails
    before the first write into the workdir but the lock file, which goes with the lock."""
    import jax

    from v4jax.cli.environment import describe
    from v4jax.workdir import trim_metrics, write_atomically

    run, data, state, checkpointer = initial_state(run, mesh, workdir)
    try:
        if jax.process_index() == 0:  # the processes of a multi-host run share the workdir
            print(describe(run.parallel), file=sys.stderr)  # what it runs on: backend, devices, kernel paths
            trim_metrics(workdir / "metrics.jsonl", int(state["step"]))
            write_atomically(workdir / "config.json", json.dumps(run.to_dict(), indent=2))
        trainer = Trainer(run, mesh, data, checkpointer, workdir, args)
        status = trainer.run(state)
        checkpointer.wait()  # the summary names a checkpoint that is on disk
        if trainer.writes:
            print(trainer.summary(), file=sys.stderr)
        return status
    finally:
        checkpointer.wait()
        checkpointer.close()


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Checks (before anything is written)


def check_local_paths(workdir: str | None, data_path: str | None) -> None:
    """The workdir and the corpus are read and written as files: a URL (gs://, s3://) would be taken
    for a local directory named "gs:". A bucket is used through a mount (docs/multihost.md)."""
    from v4jax.config import ConfigError

    for name, value in (("--workdir", workdir), ("data.path", data_path)):
        if value is not None and "://" in str(value):
            raise ConfigError(f"{name}={value!r} is a URL, and train.py reads and writes files: mount the bucket "
                              "(e.g. gcsfuse) at the same path on every host and pass that path (docs/multihost.md)")


def check_config(run) -> None:
    """The config is self-consistent: Engram's tokenizer is the data's, the vocabulary holds the
    tokenizer's, the rows fit the model's positions; a post-training run takes its prompts from
    ``post.prompts`` and runs its supervised steps before train.steps ends."""
    from v4jax.config import ConfigError

    if run.post is not None:
        if run.data.path is not None:
            raise ConfigError(f"data.path={run.data.path!r} is for pre-training and SFT; a post-training run takes its "
                              "prompts from post.prompts: leave data.path unset")
        if run.post.sft_steps >= run.train.steps:
            raise ConfigError(f"post.sft_steps={run.post.sft_steps} leaves no policy steps in train.steps="
                              f"{run.train.steps}: raise train.steps")
        if run.model.engram is not None:
            raise ConfigError("model.engram is set, and post-training samples its rollouts with the decode loop, "
                              "which does not run Engram yet: post-train a model without model.engram")

    engram = run.model.engram
    if engram is not None and engram.tokenizer not in (run.data.tokenizer, "none"):
        raise ConfigError(f"model.engram.tokenizer={engram.tokenizer!r} must be the data's tokenizer "
                          f"({run.data.tokenizer!r}) or 'none': it compresses that tokenizer's ids")
    if run.model.vocab_size < (259 if run.data.tokenizer == "bytes" else 129280):
        raise ConfigError(f"model.vocab_size={run.model.vocab_size} is smaller than the {run.data.tokenizer} "
                          "tokenizer's vocabulary")
    if run.data.seq_len > run.model.max_position_embeddings:
        raise ConfigError(f"data.seq_len={run.data.seq_len} is longer than model.max_position_embeddings="
                          f"{run.model.max_position_embeddings}: shorten the rows or raise the limit")


def check_saved(run, meta: dict, workdir: Path) -> None:
    """A checkpoint in the workdir must be of this run: same model, parameter layout and data."""
    from v4jax.checkpoint import model_config_from_meta, scan_layers_from_meta
    from v4jax.config import ConfigError

    differ = model_differences(model_config_from_meta(meta), run.model)
    differ.append(("parallel.scan_layers", scan_layers_from_meta(meta), run.parallel.scan_layers))
    differ += [(f"data.{key}", meta["data"].get(key), getattr(run.data, key))
               for key in ("tokenizer", "seq_len", "batch_size", "path", "seed", "heldout_fraction")]
    differ = [f"{name}: saved {a!r}, now {b!r}" for name, a, b in differ if a != b]
    if differ:
        raise ConfigError(f"{workdir} holds a checkpoint of another run ({'; '.join(differ)}): set these as "
                          "saved or use another --workdir")


def model_differences(a, b) -> list[tuple[str, object, object]]:
    """("model.<field>", a's value, b's value) for each field where two model configs differ."""
    return [(f"model.{f.name}", getattr(a, f.name), getattr(b, f.name))
            for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def check_batch_split(run, mesh) -> None:
    import jax
    import numpy as np

    from v4jax.config import ConfigError
    from v4jax.parallel import DEFAULT_RULES

    split = math.prod(mesh.shape[a] for a in DEFAULT_RULES["batch"])
    k = run.train.grad_accum_steps
    if run.data.batch_size % k:
        raise ConfigError(f"data.batch_size={run.data.batch_size} must be divisible by train.grad_accum_steps={k} "
                          "(the batch is the rows of one optimizer update, taken in that many micro-batches)")
    if (run.data.batch_size // k) % split:
        micro = (f"the micro-batch of {run.data.batch_size // k} rows" if k > 1
                 else f"data.batch_size={run.data.batch_size}")
        raise ConfigError(f"{micro} must be divisible by the {split} devices that split the batch "
                          "(parallel.data x fsdp x expert)")
    ways = mesh.shape["context"]
    if run.data.seq_len % ways:
        raise ConfigError(f"data.seq_len={run.data.seq_len} must be divisible by parallel.context={ways} "
                          "(each of its devices holds an equal slice of every row)")
    # each host reads whole rows (v4jax.data): the devices that share rows must be one host's
    hosts = {}
    for index, device in np.ndenumerate(mesh.devices):
        rows = tuple(i for i, a in zip(index, mesh.axis_names) if a in DEFAULT_RULES["batch"])
        hosts.setdefault(rows, set()).add(device.process_index)
    if any(len(h) > 1 for h in hosts.values()):
        raise ConfigError(f"parallel.context x tensor = {ways * mesh.shape['tensor']} devices share each row, "
                          f"more than one host has ({jax.local_device_count()}): each host reads whole rows, so "
                          "keep context x tensor within a host")


# --------------------------------------------------------------------------------------------------
# State and data


def initial_state(run, mesh, workdir: Path):
    """The run with its held-out split decided, this host's data iterator, and a fresh sharded train
    state or the newest checkpoint's that restores (the data iterator resumes with it); broken newer
    steps are renamed out of the way. Returns (run, data, state, checkpointer). The data is opened
    before a new run's parameters are made, or a resumed run's read: a bad corpus is refused without
    that wait."""
    from v4jax.checkpoint import Checkpointer
    from v4jax.config import ConfigError
    from v4jax.data import resolve_heldout_fraction
    from v4jax.trainer import state_specs

    checkpointer = Checkpointer(workdir / "checkpoints", run.train.keep_checkpoints, run.train.checkpoint_every)
    try:
        if checkpointer.latest_step() is None:
            run = dataclasses.replace(run, data=resolve_heldout_fraction(run.data))
            data = open_data(run, mesh, workdir)
            return run, data, fresh_state(run, mesh), checkpointer
        fresh = state_specs(run.model, run.train, run.parallel.scan_layers, mesh)  # nothing made or read
        resumed = {}

        def target(meta):  # called with each step's meta before its state is read
            saved = meta["data"].get("heldout_fraction", 0.0)
            this = dataclasses.replace(run, data=resolve_heldout_fraction(run.data, saved))
            check_saved(this, meta, workdir)
            resumed.update(run=this, data=open_data(this, mesh, workdir))
            return fresh

        state, data_state, _ = checkpointer.restore(target)
        run, data = resumed["run"], resumed["data"]
        try:
            data.set_state(data_state)
        except ValueError as e:
            raise ConfigError(f"{workdir}: {e}") from None
        checkpointer.set_aside_skipped()
    except BaseException:
        checkpointer.close()
        raise
    print(f"resumed from step {int(state['step'])} in {checkpointer.directory}", file=sys.stderr)
    return run, data, state, checkpointer


def fresh_state(run, mesh) -> dict:
    """Initial parameters and optimizer state, sharded over the mesh."""
    import jax

    from v4jax.model import init_params
    from v4jax.schema import param_shardings, shard_like_params
    from v4jax.trainer import init_state, make_optimizer

    if run.post is not None and run.post.init is not None:
        params = initial_policy(run, mesh)
    else:
        params = init_params(run.model, run.train.seed, scan=run.parallel.scan_layers)
    params = jax.device_put(params, param_shardings(params, mesh, run.model))
    state = init_state(params, make_optimizer(run.train, run.model))
    return jax.device_put(state, shard_like_params(state, params, mesh, run.model))


def initial_policy(run, mesh) -> dict:
    """A post-training run's starting parameters (fp32, the run's layout) from ``post.init``, whose
    model must be the config's, read sharded over ``mesh``."""
    import jax.numpy as jnp

    from v4jax.config import ConfigError
    from v4jax.post_training import load_policy
    from v4jax.scan import stack_layers

    what = f"post.init={run.post.init!r}"
    config, params, _ = load_policy(run.post.init, jnp.float32, mesh, what)
    differ = [f"{name}: checkpoint {a!r}, config {b!r}" for name, a, b in model_differences(config, run.model)]
    if differ:
        raise ConfigError(f"{what} is another model ({'; '.join(differ)}): make the model section the checkpoint's")
    return stack_layers(params, run.model) if run.parallel.scan_layers else params


def global_batch(mesh):
    """This host's rows of a batch (numpy) -> global arrays split over the mesh's batch axes."""
    import jax

    from v4jax.parallel import batch_sharding

    sharding = batch_sharding(mesh)
    return lambda b: {k: jax.make_array_from_process_local_data(sharding, v) for k, v in b.items()}


def open_data(run, mesh, workdir: Path):
    """This host's training iterator. When the run evaluates, its held-out split is opened too (read,
    tokenized and shared out over the hosts), so that what would fail at the first evaluation fails
    now, before any step. A post-training run's data is its ``v4jax.post_training.Rollouts``
    (prompts, rewards and teachers loaded and checked)."""
    from v4jax.config import ConfigError
    from v4jax.data import make_dataset
    from v4jax.engram import hasher_for
    from v4jax.post_training import Rollouts

    if run.post is not None:
        return Rollouts(run, mesh, global_batch(mesh), workdir, hasher=hasher_for(run.model))

    data = make_dataset(run.data, hasher=hasher_for(run.model))
    if run.train.eval_every:
        if run.data.path is not None and not run.data.heldout_fraction:
            raise ConfigError(
                f"train.eval_every={run.train.eval_every} evaluates on a held-out split, and data.path="
                f"{run.data.path!r} has none (data.heldout_fraction=0): leave data.heldout_fraction unset or set it "
                "in (0, 1) for a corpus of several documents (a .txt file is one, so is a .jsonl line), or set "
                "train.eval_every=0 and evaluate afterwards with eval.py --files")
        make_dataset(eval_data(run.data), hasher=hasher_for(run.model))
    return data


def eval_data(cfg):
    """The data config of the evaluations during training: the held-out split in file order, read
    again from its start each time (``eval_batches`` batches, fewer documents than that repeat)."""
    return dataclasses.replace(cfg.for_eval(), num_epochs=None)


# --------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Runs the steps from the state's step to ``train.steps``: logging, held-out evaluation,
    checkpoints, and a save on SIGINT/SIGTERM or ``--stop-after-step``. ``run`` returns the exit
    status: 0, 1 after ``train.max_bad_steps`` non-finite steps in a row or a non-finite new state,
    128 + signal; ``summary`` then says what was done. Only process 0 writes the logs."""

    def __init__(self, run, mesh, data, checkpointer, workdir: Path, args):
        import jax

        from v4jax.post_training import objective_for
        from v4jax.trainer import flops_per_token, make_eval_step, make_optimizer, make_train_step, peak_flops

        self.run_cfg, self.cfg, self.data, self.checkpointer = run, run.train, data, checkpointer
        self.workdir, self.args = workdir, args
        optimizer = make_optimizer(self.cfg, run.model, mesh, run.post)  # Muon's work spread over the mesh
        self.step_fn = make_train_step(run.model, self.cfg, optimizer, run.parallel, mesh, post=run.post)
        self.post = run.post
        # post-training: the same step with the policy objective, after post.sft_steps supervised ones
        self.policy_step_fn = (make_train_step(run.model, self.cfg, optimizer, run.parallel, mesh,
                                               objective_for(run.post), run.post) if run.post is not None else None)
        self.eval_fn = (make_eval_step(run.model, parallel=run.parallel, mesh=mesh, precision=self.cfg.precision,
                                       indexer_fp4=self.cfg.indexer_fp4)
                        if self.cfg.eval_every and run.post is None else None)
        self.to_global = global_batch(mesh)
        self.tokens_per_step = run.data.batch_size * run.data.seq_len
        self.flops_per_token = flops_per_token(run.model, run.data.seq_len)
        self.peak = peak_flops(self.cfg)
        self.meta = run.to_dict()
        self.writes = jax.process_index() == 0
        self.signal = None
        self.saved = None  # the step last saved
        # for the summary: the first and last step of this call, the last step's metrics, the last evaluation
        self.start = self.done = 0
        self.last_metrics, self.evaluated = None, None
        self.t0 = time.perf_counter()

    def run(self, state) -> int:
        from tqdm import tqdm

        self.start = self.done = int(state["step"])
        bad = 0
        bar = tqdm(total=self.cfg.steps, initial=self.start, disable=self.args.no_progress or not self.writes,
                   unit="step", dynamic_ncols=True)
        window = {"t0": time.perf_counter(), "tokens": 0}
        with self._signals(), self._logs(self.start) as (log, writer):
            try:
                for step in range(self.start, self.cfg.steps):
                    state, metrics = self._step(step, state)
                    window["tokens"] += self.tokens_per_step
                    done = self.done = step + 1
                    self.last_metrics = metrics
                    bad = 0 if bool(metrics["ok"]) else bad + 1
                    if not bool(metrics["state_finite"]):
                        print(f"step {done}: the loss and gradient are finite but the new parameters or "
                              "optimizer state are not (is train.lr too large?): that state cannot be trained "
                              f"on or saved; stopping; {self._kept()}", file=sys.stderr)
                        return 1
                    if bad:
                        print(f"step {done}: loss or gradient not finite; step skipped ({bad} in a row)",
                              file=sys.stderr)
                        if bad >= self.cfg.max_bad_steps:
                            print(f"stopping after {bad} bad steps in a row; {self._kept()}", file=sys.stderr)
                            return 1
                    if done % self.cfg.log_every == 0 or done == self.cfg.steps:
                        self._log(done, metrics, state, window, log, writer, bar)
                    bar.update(1)
                    if bad == 0 and done % self.cfg.checkpoint_every == 0:
                        self._save(done, state)
                    why = self._stop(done)
                    if why:
                        print(f"{why}: saving step {done} and stopping", file=sys.stderr)
                        if bad == 0:
                            self._save(done, state, force=True)
                        return 0 if self.signal is None else 128 + self.signal
                if self.start < self.cfg.steps and bad == 0:
                    self._save(self.cfg.steps, state, force=True)
            finally:
                bar.close()
        return 0

    def _step(self, step: int, state):
        """One optimizer update: a pre-training or SFT batch, a post-training run's supervised batch
        (its first post.sft_steps), or its rollout with the policy objective."""
        if self.post is None:
            return self.step_fn(state, self.to_global(next(self.data)))
        if step < self.post.sft_steps:
            return self.step_fn(state, self.data.sft_batch(step))
        self.data.start_policy_steps(state["params"])
        batch, rollout = self.data.policy_batch(state["params"], step)
        state, metrics = self.policy_step_fn(state, batch)
        return state, {**metrics, **rollout}

    def _stop(self, done: int) -> str:
        """Why to stop after step ``done`` ('' to go on): this process got a signal or reached
        --stop-after-step, or, in a multi-host job, another process did. The processes agree after
        every step, as the save is collective: a preemption notice that reaches some hosts stops
        them all at the same step (and they all exit as for that signal)."""
        from v4jax.multihost import largest

        mine = self.signal if self.signal is not None else 0 if done == self.args.stop_after_step else -1
        code = largest(mine)  # -1: go on; 0: --stop-after-step; N: signal N
        if code < 0:
            return ""
        where = "" if code == mine else " on another process"
        if code > 0:
            self.signal = code
            return f"signal {code}{where}"
        return f"--stop-after-step{where}"

    def summary(self) -> str:
        """What this call did and where it left the run: for stderr once the last save is on disk."""
        w = self.workdir
        if self.last_metrics is None:
            trained = f"trained: nothing, the run is at step {self.done} of train.steps={self.cfg.steps}"
        else:
            name, key = ("training loss (main head)", "lm_loss") if "lm_loss" in self.last_metrics else \
                ("mean reward", "reward_mean")  # a post-training run's policy step
            trained = (f"trained: steps {self.start + 1}-{self.done} of {self.cfg.steps} in "
                       f"{time.perf_counter() - self.t0:.0f} s; {name} {float(self.last_metrics[key]):.4f} at step "
                       f"{self.done}")
        if self.evaluated is not None:
            step, name, value = self.evaluated
            trained += f"; {name} {value:.4f} at step {step}"
        newest = self.checkpointer.latest_step()
        lines = [trained,
                 f"checkpoint: step {newest}, {w / 'checkpoints' / str(newest)}" if newest is not None
                 else "checkpoint: none saved",
                 f"metrics: {w / 'metrics.jsonl'} (TensorBoard: {w / 'tb'})"]
        if newest is not None:  # commands to paste: the workdir quoted for the shell
            q = shlex.quote(str(w))
            deepseek = self.run_cfg.data.tokenizer == "deepseek"
            prompt = "--chat chat --prompt 'Hello!'" if deepseek else "--prompt 'To be'"
            evaluate = f"v4jax-eval --workdir {q}  |  "  # perplexity: not what a post-training run is judged by
            if self.post is not None:
                evaluate = ""
                if self.post.prompts == "arithmetic":
                    prompt = "--prompt '12+34=' --temperature 0"
            lines.append(f"next: {evaluate}v4jax-generate --checkpoint {q} {prompt}  |  "
                         f"python -m v4jax.cli.plot --workdir {q}")
        return "\n".join(lines)

    def _kept(self) -> str:
        newest = self.checkpointer.latest_step()
        return f"the newest checkpoint, step {newest}, is kept" if newest is not None else "there is no checkpoint yet"

    @contextlib.contextmanager
    def _logs(self, start: int):
        """(metrics.jsonl, TensorBoard writer) on process 0, (None, None) elsewhere. TensorBoard hides
        its events after ``start`` from an earlier attempt (``purge_step``), as metrics.jsonl drops them."""
        if not self.writes:
            yield None, None
            return
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(self.workdir / "tb"), purge_step=start + 1) as writer, \
                (self.workdir / "metrics.jsonl").open("a") as log:
            yield log, writer

    def _save(self, step: int, state, force: bool = False) -> None:
        if self.saved != step:
            self.checkpointer.save(step, state, self.data.get_state(), self.meta, force=force)
            self.saved = step

    def _log(self, done, metrics, state, window, log, writer, bar) -> None:
        import jax

        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tps = window["tokens"] / (time.perf_counter() - window["t0"])
        m.update(step=done, tokens_per_s=tps, mfu=self.flops_per_token * tps / self.peak, time=time.time())
        if self.cfg.eval_every and done % self.cfg.eval_every == 0:
            if self.post is None:
                m.update(self._evaluate(state["params"]))
                self.evaluated = (done, "held-out loss (main head)", m["eval_main_loss"])
            else:
                m.update(self.data.evaluate(state["params"]))
                self.evaluated = (done, "held-out reward", m["eval_reward"])
        window.update(t0=time.perf_counter(), tokens=0)
        if not self.writes:
            return
        log.write(json.dumps(m) + "\n")
        log.flush()
        for k, v in m.items():
            if isinstance(v, float) and math.isfinite(v) and k not in ("step", "time"):
                writer.add_scalar(k, v, done)
        if "lm_loss" in m:
            bar.set_postfix(lm_loss=f"{m['lm_loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{m['mfu']:.1%}")
        else:
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", tok_s=f"{tps:,.0f}")

    def _evaluate(self, params) -> dict:
        """Held-out losses over a fixed number of batches (the same count on every host)."""
        from v4jax.data import make_dataset
        from v4jax.engram import hasher_for
        from v4jax.trainer import evaluate

        it = make_dataset(eval_data(self.run_cfg.data), hasher=hasher_for(self.run_cfg.model))
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
