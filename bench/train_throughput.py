"""Training throughput (tokens/s, MFU) of a config on 1 and 2 GPUs, per grouped-matmul backend.

    python bench/train_throughput.py --config configs/small.yaml --batch 8 --seq 2048 --steps 10

Synthetic tokens (uniform over the vocabulary), bf16 compute, fp32 parameters and optimizer state,
the full V4 step (main + MTP losses, balance and indexer losses, Muon + AdamW, bias update). For each
device count n (1, 2, ...): a mesh with expert = n (expert parallelism when n > 1) and data = 1.
Also checks, on >= 2 devices, that the dropless ragged_all_to_all dispatch (which XLA:CPU lacks, so
the CPU tests cannot run it) gives the single-device reference's MoE output.
Prints a table; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import model_config_from_yaml
from v4jax.model import init_params
from v4jax.moe import route, routed_experts, routed_experts_all_to_all, routed_experts_ragged
from v4jax.parallel import ParallelConfig, batch_sharding, make_mesh
from v4jax.schema import param_shardings, shard_like_params
from v4jax.trainer import TrainConfig, flops_per_token, init_state, make_optimizer, make_train_step

PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12}


def synthetic_batch(config, b, s, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, size=(b, s)).astype(np.int32)
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": np.ones((b, s), np.int32), "targets": np.roll(tokens, -1, 1),
            "loss_mask": np.ones((b, s), np.float32), "mtp_targets": np.roll(tokens, -2, 1),
            "mtp_mask": np.ones((b, s), np.float32)}


def check_ragged(config, devices):
    """Max relative error of both expert-parallel dispatches against the single-device MoE."""
    mesh = make_mesh(ParallelConfig(1, 1, len(devices), 1), devices)
    n = config.num_hash_layers + 1
    small = config.replace(num_hidden_layers=n, layer_types=config.layer_types[:n], num_nextn_predict_layers=0)
    p = init_params(small, 0)["layers"][-1]["ffn"]
    x = jax.random.normal(jax.random.PRNGKey(0), (512, config.hidden_size), jnp.float32)
    idx, w, _ = route(x, p["gate"], jnp.zeros(512, jnp.int32), config)
    ref = np.asarray(routed_experts(x, idx, w, p["experts"], config.swiglu_limit)[0])
    out = {}
    if devices[0].platform == "cpu":  # XLA:CPU has no ragged-all-to-all
        out["ragged"] = None
    else:
        ragged, _ = jax.jit(lambda *a: routed_experts_ragged(*a, config.swiglu_limit, mesh))(x, idx, w, p["experts"])
        out["ragged"] = float(np.abs(np.asarray(ragged) - ref).max() / np.abs(ref).max())
    capacity, dropped = jax.jit(lambda *a: routed_experts_all_to_all(
        *a, config.swiglu_limit, mesh, capacity_factor=float(len(devices))))(x, idx, w, p["experts"])
    out["capacity"] = float(np.abs(np.asarray(capacity) - ref).max() / np.abs(ref).max())
    out["capacity_dropped"] = int(dropped)
    return out


def run(config, devices, backend, dispatch, b, s, steps, remat, scan=True, precision="bf16"):
    n = len(devices)
    par = ParallelConfig(1, 1, n, 1, moe_dispatch=dispatch, moe_backend=backend, capacity_factor=2.0, remat=remat,
                         scan_layers=scan)
    mesh = make_mesh(par, devices)
    cfg = TrainConfig(steps=1000, dtype="bfloat16", log_every=1, precision=precision)
    opt = make_optimizer(cfg, config)
    params = init_params(config, 0, scan=scan)
    params = jax.device_put(params, param_shardings(params, mesh, config))
    state = init_state(params, opt)
    state = jax.device_put(state, shard_like_params(state, params, mesh, config))
    step = make_train_step(config, cfg, opt, par, mesh)
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in synthetic_batch(config, b, s).items()}
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t
    first_loss, oks = float(m["loss"]), [bool(m["ok"])]
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
        oks.append(bool(m["ok"]))
    med = float(np.median(times))
    tps = b * s / med
    peak = PEAK_BF16.get(devices[0].device_kind, float("nan")) * n
    return {"devices": n, "backend": backend, "dispatch": dispatch if n > 1 else "-", "precision": precision,
            "batch": b, "seq": s,
            "remat": remat, "scan": scan, "step_s": med, "step_s_spread": float(np.max(times) - np.min(times)),
            "tokens_per_s": tps, "mfu": flops_per_token(config, s) * tps / peak, "compile_s": compile_s,
            "first_loss": first_loss, "loss": float(m["loss"]), "ok_steps": f"{sum(oks)}/{len(oks)}",
            "dropped": int(m["dropped_tokens"]),
            "peak_mem_gb": max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices) / 2**30}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backends", default="ragged_dot,padded")
    ap.add_argument("--devices", default="1,2", help="device counts to run")
    ap.add_argument("--dispatch", default="capacity,ragged", help="expert-parallel dispatches to run on > 1 GPU")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers instead of jax.lax.scan")
    ap.add_argument("--skip-check", action="store_true", help="skip the dispatch correctness check")
    ap.add_argument("--precisions", default="bf16", help="train.precision values to run, e.g. bf16,fp8,fp8+fp4qat")
    ap.add_argument("--json", default=None, help="write every figure here (rewritten after each run)")
    args = ap.parse_args()
    config = model_config_from_yaml(args.config)
    devs = jax.devices()
    print(f"{len(devs)} x {devs[0].device_kind}, jax {jax.__version__}", flush=True)
    results = {"check": None, "runs": []}
    if len(devs) >= 2 and not args.skip_check:
        results["check"] = check_ragged(config, devs[:2])
        print("expert-parallel dispatch vs single device (max rel err):", results["check"], flush=True)
    for n in [int(x) for x in args.devices.split(",") if int(x) <= len(devs)]:
        for backend in args.backends.split(","):
            ragged = n > 1 and devs[0].platform != "cpu"
            dispatches = [d for d in args.dispatch.split(",") if ragged or d == "capacity"] if n > 1 else ["capacity"]
            for dispatch, precision in ((d, p) for d in dispatches for p in args.precisions.split(",")):
                try:
                    r = run(config, devs[:n], backend, dispatch, args.batch, args.seq, args.steps, args.remat,
                            not args.no_scan, precision)
                except Exception as e:  # keep measuring the other settings; report the failure
                    r = {"devices": n, "backend": backend, "dispatch": dispatch, "precision": precision,
                         "error": repr(e)[:300]}
                results["runs"].append(r)
                print(json.dumps(r), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=2)
    print(f"\n{'gpus':>4} {'backend':>10} {'dispatch':>9} {'precision':>10} {'step s':>8} {'tok/s':>9} {'MFU':>6} "
          f"{'mem GB':>7}")
    for r in results["runs"]:
        head = f"{r['devices']:>4} {r['backend']:>10} {r['dispatch']:>9} {r['precision']:>10}"
        if "error" in r:
            print(f"{head}  error: {r['error'][:80]}")
        else:
            print(f"{head} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['mfu']:6.1%} {r['peak_mem_gb']:7.1f}")


if __name__ == "__main__":
    main()
