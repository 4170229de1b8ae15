"""Train a DeepSeek-V4 model.

    python train.py [--config configs/tiny.yaml] [--workdir runs/tiny] [section.key=value ...]

With no arguments it trains the tiny config on the bundled corpus on CPU. If the workdir holds a
checkpoint, training resumes from it (same model and data settings required). Writes
``WORKDIR/metrics.jsonl`` (one JSON object per logged step), TensorBoard events under
``WORKDIR/tb``, checkpoints under ``WORKDIR/checkpoints`` and the resolved config in
``WORKDIR/config.json``. SIGINT/SIGTERM save a checkpoint before exiting.
"""

from __future__ import annotations

import argparse
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML file with model/train/data sections")
    p.add_argument("--workdir", default=None, help="output and checkpoint directory (default: runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--stop-after-step", type=int, default=None, metavar="N",
                   help="save and stop after step N (split a run into jobs; the same command resumes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 model.hidden_size=128")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from v4jax.parallel import initialize_distributed

    initialize_distributed()  # multi-host jobs: from the environment (see README); a no-op otherwise
    from v4jax.checkpoint import Checkpointer, abstract
    from v4jax.config import ConfigError
    from v4jax.data import make_dataset
    from v4jax.trainer import (flops_per_token, init_state, load_run_config, make_eval_step, make_optimizer,
                               make_train_step, peak_flops)

    # Everything is validated before the workdir is touched.
    try:
        run = load_run_config(args.config, args.overrides)
    except (ConfigError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.exists():
        saved = Checkpointer(ckpt_dir, run.train.keep_checkpoints).read_meta()
        if saved is not None:
            problem = _resume_problem(saved, run)
            if problem:
                print(f"error: {workdir} holds a checkpoint of another run ({problem}); use another --workdir",
                      file=sys.stderr)
                return 2
    if run.data.seq_len < 2 or run.model.vocab_size < (259 if run.data.tokenizer == "bytes" else 129280):
        print(f"error: model.vocab_size={run.model.vocab_size} is smaller than the {run.data.tokenizer} "
              "tokenizer's vocabulary", file=sys.stderr)
        return 2

    from v4jax.parallel import ShardingError, batch_sharding, make_mesh, param_shardings, shard_like_params

    try:
        mesh = make_mesh(run.parallel)
    except ShardingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch_split = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    if run.data.batch_size % batch_split:
        print(f"error: data.batch_size={run.data.batch_size} must be divisible by the {batch_split} devices "
              "that split the batch (parallel.data x fsdp x expert)", file=sys.stderr)
        return 2
    cfg, config = run.train, run.model
    data = make_dataset(run.data)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2))

    from v4jax.model import init_params

    optimizer = make_optimizer(cfg, config)
    params = init_params(config, cfg.seed, scan=run.parallel.scan_layers)
    params = jax.device_put(params, param_shardings(params, mesh, config))
    state = init_state(params, optimizer)
    state = jax.device_put(state, shard_like_params(state, params, mesh, config))
    checkpointer = Checkpointer(ckpt_dir, cfg.keep_checkpoints, cfg.checkpoint_every)
    if checkpointer.latest_step() is not None:
        state, data_state, _ = checkpointer.restore(abstract(state))
        data.set_state(data_state)
        print(f"resumed from step {int(state['step'])} in {ckpt_dir}", file=sys.stderr)
    meta = run.to_dict()

    step_fn = make_train_step(config, cfg, optimizer, run.parallel, mesh)
    eval_fn = make_eval_step(config, parallel=run.parallel, mesh=mesh) if cfg.eval_every else None
    to_global = lambda b: {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)  # noqa: E731
                           for k, v in b.items()}
    tokens_per_step = run.data.batch_size * run.data.seq_len
    flops_step = flops_per_token(config, run.data.seq_len) * tokens_per_step
    peak = peak_flops(cfg)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(str(workdir / "tb"))
    start = int(state["step"])
    bar = tqdm(total=cfg.steps, initial=start, disable=args.no_progress, unit="step", dynamic_ncols=True)
    bad, t0, window_tokens, last = 0, time.perf_counter(), 0, None
    status = 0
    try:
        with (workdir / "metrics.jsonl").open("a") as log:
            for step in range(start, cfg.steps):
                batch = to_global(next(data))
                state, metrics = step_fn(state, batch)
                window_tokens += tokens_per_step
                done = step + 1
                if not bool(metrics["ok"]):
                    bad += 1
                    print(f"step {done}: loss or gradient not finite; step skipped ({bad} in a row)", file=sys.stderr)
                    if bad >= cfg.max_bad_steps:
                        print(f"stopping after {bad} bad steps in a row; the last good checkpoint is kept",
                              file=sys.stderr)
                        status = 1
                        break
                else:
                    bad = 0
                if done % cfg.log_every == 0 or done == cfg.steps:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - t0
                    tps = window_tokens / elapsed
                    m.update(step=done, tokens_per_s=tps, mfu=flops_step / tokens_per_step * tps / peak,
                             time=time.time())
                    if eval_fn is not None and done % cfg.eval_every == 0:
                        m.update(_evaluate(eval_fn, state["params"], run.data, cfg.eval_batches, to_global))
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                    for k, v in m.items():
                        if isinstance(v, float) and math.isfinite(v) and k not in ("step", "time"):
                            writer.add_scalar(k, v, done)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{m['mfu']:.1%}")
                    t0, window_tokens = time.perf_counter(), 0
                bar.update(1)
                if bad == 0 and done % cfg.checkpoint_every == 0:
                    checkpointer.save(done, state, data.get_state(), meta)
                    last = done
                if stop["signal"] is not None or done == args.stop_after_step:
                    why = f"signal {stop['signal']}" if stop["signal"] is not None else "--stop-after-step"
                    print(f"{why}: saving step {done} and stopping", file=sys.stderr)
                    if bad == 0 and last != done:
                        checkpointer.save(done, state, data.get_state(), meta, force=True)
                        last = done
                    status = 0 if stop["signal"] is None else 128 + stop["signal"]
                    break
            else:
                if bad == 0 and last != cfg.steps and start < cfg.steps:
                    checkpointer.save(cfg.steps, state, data.get_state(), meta, force=True)
    finally:
        bar.close()
        writer.close()
        checkpointer.wait()
        checkpointer.close()
        for s, h in old.items():
            signal.signal(s, h)
    return status


def _resume_problem(saved: dict, run) -> str | None:
    from v4jax.checkpoint import model_config_from_meta, scan_layers_from_meta

    if model_config_from_meta(saved) != run.model:
        return "its model config differs"
    scanned = scan_layers_from_meta(saved)
    if scanned != run.parallel.scan_layers:
        return (f"parallel.scan_layers differs: saved {scanned}, now {run.parallel.scan_layers}; the parameter "
                "layouts differ, so set it as saved")
    for key in ("tokenizer", "seq_len", "batch_size", "path", "seed"):
        if saved["data"].get(key) != getattr(run.data, key):
            return f"data.{key} differs: saved {saved['data'].get(key)!r}, now {getattr(run.data, key)!r}"
    return None


def _evaluate(eval_fn, params, data_cfg, batches: int, to_global) -> dict:
    """Held-out losses over a fixed number of batches (the same count on every host)."""
    from v4jax.data import make_dataset
    from v4jax.trainer import evaluate

    it = make_dataset(dataclasses.replace(data_cfg.for_eval(), num_epochs=None))
    heads = evaluate(eval_fn, params, (to_global(b) for _, b in zip(range(batches), it)))
    return {f"eval_{head}_loss": r["loss"] for head, r in heads.items()}


if __name__ == "__main__":
    sys.exit(main())
