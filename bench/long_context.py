"""Long-context prefill and training: time and memory against the sequence length, on one device.

    python bench/long_context.py prefill --config configs/small.yaml --seqs 32768,131072,524288,1048576
    python bench/long_context.py train --config configs/small.yaml --seqs 8192,32768,131072 --remat full
    python bench/long_context.py train --config configs/small.yaml --batch 8 --seqs 2048 --steps 10

``prefill``: the forward pass over one row of random tokens, bf16 parameters and compute, ending in
the logits of the last position (what generation needs; the [s, vocab] logits of a 1M-token row
would be 0.5 TB). ``train``: the full training step (bf16 compute, fp32 parameters, Muon + AdamW,
every loss) on rows of ``--seqs`` tokens. Lengths run in ascending order in one process, so the
device's high-water mark after each run is that run's peak; XLA's own temporary-memory figure of
each compiled program is printed too. A length that fails (out of memory) is recorded and the
next ones are skipped.

``--tree DIR`` imports v4jax from another checkout (the peer: an earlier commit, run on the same
machine in the same call). ``--run-after FILE`` compiles, then waits for FILE to exist before
running, and ``--compiled FILE`` is written once compiled: two processes compile at the same time
and then run one after the other (an autotuned compile of the 2K step takes four minutes). Parameters are drawn on the device (``jax.random``), not on the host.
Prints one JSON line per run and a table; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def device_params(v4, config, dtype, scan):
    """A random model drawn on the device (trees since the parameter declarations do so themselves;
    for older trees, the same kinds of values through their ``_build``)."""
    import jax
    import jax.numpy as jnp

    if not hasattr(v4.model, "_build"):
        return v4.model.init_params(config, 0, dtype, scan)
    counter = iter(range(1 << 30))
    key = jax.random.PRNGKey(0)
    leaf_dtype = {"param": dtype, "f32": jnp.float32, "int": jnp.int32}

    def make(kind, shape, group):
        dt = leaf_dtype[group]
        k = jax.random.fold_in(key, next(counter))
        if kind == "normal":
            return (jax.random.normal(k, shape, jnp.float32) * config.initializer_range).astype(dt)
        if kind == "hash":
            u = jax.random.uniform(k, (shape[0], config.n_routed_experts))
            return jnp.argsort(u, axis=1)[:, : shape[1]].astype(dt)
        return jnp.full(shape, {"ones": 1.0, "zeros": 0.0, "hc_scale": 0.01}[kind], dt)

    params = v4.model._build(config, make)
    return v4.scan.stack_layers(params, config) if scan else params


def optimizer(v4, cfg, config):
    """The tree's optimizer (its make_optimizer takes the model config since the declarations)."""
    import inspect

    if "config" in inspect.signature(v4.trainer.make_optimizer).parameters:
        return v4.trainer.make_optimizer(cfg, config)
    return v4.trainer.make_optimizer(cfg)


def synthetic_batch(config, batch, seq):
    """Rows of uniform random tokens, one document each, every position in the losses."""
    import numpy as np

    tokens = np.random.default_rng(0).integers(3, config.vocab_size, size=(batch, seq)).astype(np.int32)
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32), "targets": np.roll(tokens, -1, 1),
            "loss_mask": np.ones((batch, seq), np.float32), "mtp_targets": np.roll(tokens, -2, 1),
            "mtp_mask": np.ones((batch, seq), np.float32)}


def peak_gib(device):
    return (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30


def last_position_logits(v4, params, tokens, config, parallel):
    """The forward pass, then the head at the last position only. Trees before the index-list
    attention have no ``logits=False``; their head is patched to the last position instead (the same
    work as the new path: no [s, vocab] logits either way). Also returns the tokens the MoE dropped."""
    import jax.numpy as jnp

    if "logits" in v4.model.forward.__code__.co_varnames:
        out = v4.model.forward(params, tokens, config, dtype=jnp.bfloat16, parallel=parallel, logits=False)
        logits = v4.layers.linear_f32(out["hidden"][:, -1], params["head"])
    else:
        head = v4.model._head
        v4.model._head = lambda x, *a: head(x[:, -1:], *a)[:, 0]
        try:
            out = v4.model.forward(params, tokens, config, dtype=jnp.bfloat16, parallel=parallel)
        finally:
            v4.model._head = head
        logits = out["logits"]
    return logits, sum(jnp.sum(info["dropped"]) for info in out["routing"])


def prefill(v4, params, config, seq, runs, parallel):
    import jax
    import jax.numpy as jnp
    import numpy as np

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, size=(1, seq)), jnp.int32)
    fn = jax.jit(lambda p, t: last_position_logits(v4, p, t, config, parallel))
    t0 = time.perf_counter()
    compiled = fn.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    before_timing()
    times = []
    while len(times) < runs and sum(times) < 30:  # a long run is not repeated past 30 s
        t0 = time.perf_counter()
        logits, dropped = compiled(params, tokens)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    return {"tokens_per_s": seq / float(np.median(times)), "time_s": float(np.median(times)),
            "times_s": [round(t, 3) for t in times], "compile_s": compile_s, "dropped": int(dropped),
            "xla_temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30}


def train(v4, state, config, batch, seq, steps, parallel):
    """Returns the figures and the state after the steps (the input state is donated)."""
    import jax
    import numpy as np

    cfg = v4.trainer.TrainConfig(steps=1000, dtype="bfloat16", log_every=1)
    opt = optimizer(v4, cfg, config)
    data = jax.device_put(synthetic_batch(config, batch, seq))
    step = v4.trainer.make_train_step(config, cfg, opt, parallel)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    before_timing()
    times, oks, losses = [], [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m["loss"])
        if i:  # the first call is not timed
            times.append(time.perf_counter() - t0)
        oks.append(bool(m["ok"]))
        losses.append(float(m["loss"]))
    med = float(np.median(times))
    tps = batch * seq / med
    return state, {"step_s": med, "step_s_spread": float(max(times) - min(times)), "tokens_per_s": tps,
            "mfu": v4.trainer.flops_per_token(config, seq) * tps / 989e12, "compile_s": compile_s,
            "first_loss": losses[0], "last_loss": losses[-1], "ok_steps": f"{sum(oks)}/{len(oks)}",
            "dropped": int(m["dropped_tokens"]), "xla_temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30}


SYNC = {"compiled": None, "run_after": None}  # the --compiled and --run-after files


def before_timing():
    """Signal that this process has compiled, then wait for the other one's signal (if any)."""
    if SYNC["compiled"]:
        open(SYNC["compiled"], "w").close()
    while SYNC["run_after"] and not os.path.exists(SYNC["run_after"]):
        time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["prefill", "train"])
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--batch", type=int, default=1, help="rows per training step (prefill: always 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (prefill: timed runs)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--backend", default="padded", help="MoE grouped matmul")
    ap.add_argument("--capacity-factor", type=float, default=2.0)
    ap.add_argument("--tree", default=None, help="import v4jax from this checkout (the peer)")
    ap.add_argument("--label", default=None, help="name of this tree in the output")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (CPU trials)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: skip a length that would end after this (the last length's compile time plus "
                         "its run time scaled with the length to the power 1.5, as the H200 prefill scaled)")
    ap.add_argument("--run-after", default=None, help="after compiling, wait for this file to exist")
    ap.add_argument("--compiled", default=None, help="write this file once compiled")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    SYNC.update(compiled=args.compiled, run_after=args.run_after)
    run(args)


def run(args):
    started = time.perf_counter()
    if args.tree:
        sys.path.insert(0, args.tree)
    import dataclasses

    import jax
    import jax.numpy as jnp

    import v4jax
    import v4jax.layers
    import v4jax.model
    import v4jax.scan
    import v4jax.trainer
    from v4jax.config import model_config_from_yaml
    from v4jax.parallel import ParallelConfig

    config = model_config_from_yaml(args.config)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=config.layer_types[: args.layers])
    fields = {f.name for f in dataclasses.fields(ParallelConfig)}
    par = ParallelConfig(**{k: v for k, v in dict(moe_backend=args.backend, capacity_factor=args.capacity_factor,
                                                  remat=args.remat, scan_layers=True).items() if k in fields})
    dev = jax.devices()[0]
    label = args.label or (args.tree or "this tree")
    head = {"tree": label, "device": dev.device_kind, "jax": jax.__version__, "mode": args.mode,
            "config": args.config, "batch": args.batch if args.mode == "train" else 1, "remat": args.remat,
            "backend": args.backend}
    print(json.dumps(head), flush=True)
    results = []
    if args.mode == "prefill":
        params = device_params(v4jax, config, jnp.bfloat16, True)
    else:
        opt = optimizer(v4jax, v4jax.trainer.TrainConfig(steps=1000, dtype="bfloat16"), config)
        state = v4jax.trainer.init_state(device_params(v4jax, config, jnp.float32, True), opt)
    last = None
    for seq in sorted(int(s) for s in args.seqs.split(",")):
        row = dict(head, seq=seq)
        if args.deadline and last is not None:
            ran = sum(last.get("times_s", [])) + last.get("step_s", 0) * (args.steps + 1)
            predicted = last["compile_s"] + ran * (seq / last["seq"]) ** 1.5
            if time.perf_counter() - started + predicted > args.deadline:
                row["error"] = f"skipped: predicted {predicted:.0f} s, past the {args.deadline:.0f} s deadline"
                results.append(row)
                print(json.dumps(row), flush=True)
                break
        try:
            if args.mode == "prefill":
                row.update(prefill(v4jax, params, config, seq, args.steps, par))
            else:
                state, figures = train(v4jax, state, config, args.batch, seq, args.steps, par)
                row.update(figures)
        except Exception as e:  # noqa: BLE001  (an out-of-memory run is a result)
            row["error"] = repr(e)[:400]
        row["peak_gib"] = peak_gib(dev)
        results.append(row)
        last = row
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        if "error" in row:
            break
    print(f"\n{label}: {args.mode}, {dev.device_kind}")
    print(f"{'tokens':>9} {'time s':>8} {'tok/s':>10} {'peak GiB':>9} {'XLA temp GiB':>13} {'compile s':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['seq']:>9}  failed: {r['error'][:100]}")
        else:
            t = r.get("time_s", r.get("step_s"))
            print(f"{r['seq']:>9} {t:8.3f} {r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f} {r['xla_temp_gib']:13.2f} "
                  f"{r['compile_s']:10.1f}")


if __name__ == "__main__":
    main()
