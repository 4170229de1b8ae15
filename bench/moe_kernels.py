"""The three products of the MoE grouped matmul, per kernel, at the training shapes of a config.

    python3 bench/moe_kernels.py --config configs/bench-flash-8l.yaml --tokens 16384 [--autotune OUT.json]

Rows m = tokens x experts per token, sorted by expert with group sizes drawn as the router's would
be at random (multinomial, uniform experts). For the up projection (x [m, d] times fused w1|w3,
stored [e, 2f, d]) and the down projection (h [m, f] times w2, stored [e, d, f]) it times the
forward product (ragged rows), the input gradient (ragged rows) and the weight gradient (ragged
contracting dimension, (dy, x) -> [e, n, k]) with each kernel, through the model's own
``v4jax.moe.ragged_product``: ``xla`` (jax.lax.ragged_dot_general), tokamax's ``mosaic`` and
``triton``, and ``pallas`` (``v4jax.grouped_matmul_kernel``, the weight gradient only;
``pallas:BMxBPxBQxWARPSxSTAGES`` picks its blocks). bf16 inputs, fp32 accumulation, bf16 output.
Median of 10 runs after 3, in TFLOP/s (2 m k n per product). ``--autotune F`` runs tokamax's autotuner on the
chosen kernel of each product over ``--space`` and adds the result to F (``tokamax.AutotuningResult``
JSON), then times those products again under it, against tokamax's heuristics. The model uses the
heuristics: on an H200 the search found nothing clearly better (docs/benchmarks.md, Part 4).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import timed

from v4jax.grouped_matmul_kernel import Blocks, group_outer
from v4jax.moe import DLHS, DRHS, FWD, ragged_product

DIMS = {"fwd": FWD, "dlhs": DLHS, "drhs": DRHS}


def product(kind: str, impl: str):
    """The model's product ``kind`` (fwd, dlhs, drhs) with kernel ``impl``, jitted."""
    if impl.startswith("pallas:"):
        blocks = Blocks(*map(int, impl.split(":")[1].split("x")))
        return jax.jit(lambda a, b, sizes: group_outer(a, b, sizes, a.dtype, blocks))
    return jax.jit(lambda a, b, sizes: ragged_product(a, b, sizes, DIMS[kind], impl))


def operands(kind, m, k, n, g, sizes, key):
    ka, kb = jax.random.split(key)
    bf = jnp.bfloat16
    if kind == "fwd":
        return jax.random.normal(ka, (m, k), bf), jax.random.normal(kb, (g, n, k), bf) * 0.02
    if kind == "dlhs":
        return jax.random.normal(ka, (m, n), bf), jax.random.normal(kb, (g, n, k), bf) * 0.02
    return jax.random.normal(ka, (m, n), bf), jax.random.normal(kb, (m, k), bf)


def in_space(config, space: str) -> bool:
    """Whether a tokamax Mosaic ragged-dot config is searched: ``full`` is tokamax's whole sm90 space
    (384 per product, more than a device call's budget at two configs' six products); ``small``
    keeps its block_m 64 / 128, block_k 128 / 256, no grid tiling (32 per product)."""
    return space == "full" or (config.block_m in (64, 128) and config.block_k in (128, 256)
                               and config.grid_tile_width == 1)


def autotune(tokamax, fn, ops, space: str, path: str):
    """tokamax's autotuner over each tokamax op in ``fn(*ops)``, restricted to ``in_space``; the
    result (``tokamax.AutotuningResult``) is merged into the one already at ``path`` (other shapes'
    entries stay) and written there."""
    data = []
    for ba in tokamax.autotuning.get_bound_args(fn, *ops):
        configs = {c for c in ba.autotuning_configs if in_space(c, space)}
        t = time.perf_counter()
        tuned = ba.autotune(configs, cache_results=False)
        print(f"  {len(configs)} configs in {time.perf_counter() - t:.0f} s: {tuned.fastest_config}", flush=True)
        data.append((ba, tuned))
    old = ()
    if os.path.exists(path):
        with open(path) as fh:
            old = tokamax.AutotuningResult.loads(fh.read()).data
    res = tokamax.AutotuningResult(jax.devices()[0].device_kind, tuple(old) + tuple(data))
    with open(path, "w") as fh:
        fh.write(res.dumps(prune_errors=True))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench-flash-8l.yaml")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--impls", default="xla,mosaic,triton")
    ap.add_argument("--autotune", default=None, help="add tokamax's autotuning result to this file")
    ap.add_argument("--space", default="small", choices=("small", "full"), help="the configs searched (in_space)")
    ap.add_argument("--chosen", default="fwd=mosaic,dlhs=mosaic,drhs=mosaic", help="kernels to autotune")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from v4jax.config import model_config_from_yaml

    c = model_config_from_yaml(args.config)
    g, d, f, k = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    m = args.tokens * k
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(np.bincount(rng.integers(0, g, m), minlength=g), jnp.int32)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; m={m} d={d} f={f} e={g}; "
          f"group sizes {int(sizes.min())}..{int(sizes.max())}", flush=True)
    shapes = {"up": (d, 2 * f), "down": (f, d)}
    rows, ref = [], {}
    for name, (kk, n) in shapes.items():
        for kind in ("fwd", "dlhs", "drhs"):
            a, b = operands(kind, m, kk, n, g, sizes, jax.random.PRNGKey(len(rows)))
            for impl in args.impls.split(","):
                if impl.startswith("pallas") and kind != "drhs":
                    continue
                r = {"matrix": name, "product": kind, "impl": impl, "m": m, "k": kk, "n": n}
                try:
                    out, ms, compile_s = timed(product(kind, impl), (a, b, sizes), reps=10, warmup=3)
                    r.update(ms=ms, tflops=2 * m * kk * n / ms / 1e9, compile_s=compile_s)
                    out = np.asarray(out, np.float32)
                    key = (name, kind)
                    if key in ref:
                        r["max_rel_err_vs_first"] = float(np.abs(out - ref[key]).max() / np.abs(ref[key]).max())
                    else:
                        ref[key] = out
                except Exception as e:  # report and go on
                    r["error"] = repr(e)[:300]
                rows.append(r)
                print(json.dumps(r), flush=True)
    result = {"rows": rows}
    if args.autotune:
        import tokamax

        chosen = dict(kv.split("=") for kv in args.chosen.split(","))
        t0 = time.perf_counter()

        def all_products(group_sizes, *ops):
            # group sizes as an argument, as the model passes them: a closed-over constant gave
            # autotuning keys (a count and a total) that the model's calls (an array) never match
            outs, i = [], 0
            for name, (kk, n) in shapes.items():
                for kind in ("fwd", "dlhs", "drhs"):
                    outs.append(ragged_product(ops[i], ops[i + 1], group_sizes, DIMS[kind], chosen[kind]))
                    i += 2
            return outs

        ops = [sizes]
        for name, (kk, n) in shapes.items():
            for kind in ("fwd", "dlhs", "drhs"):
                ops += operands(kind, m, kk, n, g, sizes, jax.random.PRNGKey(0))
        res = autotune(tokamax, jax.jit(all_products), ops, args.space, args.autotune)
        result["autotune_s"] = time.perf_counter() - t0
        print(f"autotuned in {result['autotune_s']:.0f} s -> {args.autotune}", flush=True)
        with res:
            for name, (kk, n) in shapes.items():
                for kind in ("fwd", "dlhs", "drhs"):
                    a, b = operands(kind, m, kk, n, g, sizes, jax.random.PRNGKey(1))
                    _, ms, _ = timed(product(kind, chosen[kind]), (a, b, sizes), reps=10, warmup=3)
                    r = {"matrix": name, "product": kind, "impl": chosen[kind] + " (autotuned)", "ms": ms,
                         "tflops": 2 * m * kk * n / ms / 1e9}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print(f"\n{'matrix':>6} {'product':>7} {'kernel':>20} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        tail = f"{r['ms']:8.2f} {r['tflops']:8.0f}" if "ms" in r else "error: " + r["error"][:70]
        print(f"{r['matrix']:>6} {r['product']:>7} {r['impl']:>20} {tail}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
