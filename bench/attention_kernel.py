"""The index-list attention: the Pallas (Triton) kernels against the XLA path, on one GPU.

    python3 bench/attention_kernel.py --json attention_kernel.json [--reps 5] [--cases a-csa,b-hca]

Cases: (a) b=4, s=4096, h=16, c=512 and (b) b=8, s=2048, h=16, c=128, each with window 128 and
either CSA (ratio 4, top-256 listed) or HCA (ratio 128, every visible entry). One document per row;
the listed entries are random distinct visible ones (-1 padded where a query sees fewer), drawn
with ``jax.random`` on the device. bf16 inputs. For each of ``v4jax.index_list.sparse_attention`` with
CSA's entries gathered (xla) or as a mask over all entries (mask, CSA only) and
``v4jax.attention_kernel.pallas_sparse_attention`` (pallas) it times the forward pass and
the forward + backward pass (gradients of <out, cotangent> in q, kv, the entries and the sink): the
median of ``--reps`` runs after two warm-ups, ``jax.block_until_ready``, in ms, with the compile
time. It also reports the others' largest error against the xla row on the device, for the
output and each gradient, as max |other - xla| / max |xla|. A failing implementation is reported
for its case and the rest go on. Prints a table; ``--json`` writes every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
from timing import timed

from v4jax.attention import compressed_entries
from v4jax.attention_kernel import pallas_sparse_attention
from v4jax.index_list import Entries, sparse_attention

SHAPES = {"a": {"b": 4, "s": 4096, "h": 16, "c": 512}, "b": {"b": 8, "s": 2048, "h": 16, "c": 128}}
KINDS = {"csa": {"m": 4, "topk": 256}, "hca": {"m": 128, "topk": None}}
WINDOW = 128
IMPLS = {"xla": functools.partial(sparse_attention, mask_ratio=0),  # CSA's listed entries gathered
         "mask": functools.partial(sparse_attention, mask_ratio=1 << 30),  # ... as a mask over all entries
         "pallas": pallas_sparse_attention}


def inputs(b, s, h, c, m, topk, seed=0):
    """q [b, s, h, c], kv [b, s, c], sink [h], segment ids and positions [b, s], the entries and
    (CSA) the listed entry indices [b, s, topk], all on the device."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    bf = jnp.bfloat16
    q = jax.random.normal(keys[0], (b, s, h, c), bf)
    kv = jax.random.normal(keys[1], (b, s, c), bf)
    sink = jax.random.normal(keys[2], (h,), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    seg = jnp.ones((b, s), jnp.int32)
    start, valid = compressed_entries(pos, seg, m)
    block_pos = jnp.take_along_axis(pos, start, axis=1)
    e = start.shape[1]
    entries = Entries(jax.random.normal(keys[3], (b, e, c), bf), jnp.take_along_axis(seg, start, axis=1),
                      block_pos + (m - 1), start + (m - 1), valid)
    idx = None
    if topk is not None:  # random distinct visible entries: the top-k of random scores over the visible ones
        score = jnp.where(entries.visible(seg, pos), jax.random.uniform(keys[4], (b, s, e)), -jnp.inf)
        vals, idx = jax.lax.top_k(score, topk)
        idx = jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)
    cotangent = jax.random.normal(keys[5], (b, s, h, c), bf)
    return (q, kv, sink, entries.keys), (seg, pos, entries, idx), cotangent


def programs(impl, statics):
    """(forward, forward + backward) of one implementation as jitted functions of the differentiable inputs."""
    seg, pos, entries, idx = statics
    fn = IMPLS[impl]

    def forward(q, kv, sink, ekeys):
        return fn(q, kv, sink, seg, pos, WINDOW, entries._replace(keys=ekeys), idx)[0]

    def grads(q, kv, sink, ekeys, ct):
        out, vjp = jax.vjp(forward, q, kv, sink, ekeys)
        return out, vjp(ct)

    return jax.jit(forward), jax.jit(grads)


def rel(got, want) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def run_case(name, reps):
    shape, kind = name.split("-")
    dims = SHAPES[shape]
    diff, statics, ct = inputs(**dims, **KINDS[kind])
    row = {"case": name, **dims, "window": WINDOW, **KINDS[kind], "entries": int(diff[3].shape[1])}
    results = {}
    for impl in IMPLS:
        if impl == "mask" and KINDS[kind]["topk"] is None:  # HCA lists no entries: the same as xla
            continue
        fwd, both = programs(impl, statics)
        try:
            out, row[f"{impl}_fwd_ms"], row[f"{impl}_fwd_compile_s"] = timed(fwd, diff, reps)
            (_, g), row[f"{impl}_fwd_bwd_ms"], row[f"{impl}_fwd_bwd_compile_s"] = timed(both, (*diff, ct), reps)
            results[impl] = (out, g)
        except Exception as err:  # noqa: BLE001 - one failing kernel is a result, not the end of the run
            row[f"{impl}_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            traceback.print_exc()
    for impl in results.keys() - {"xla"}:
        if "xla" not in results:
            break
        (out_x, g_x), (out_p, g_p) = results["xla"], results[impl]
        row[f"err_{impl}_out"] = rel(out_p, out_x)
        for label, a, b in zip(("dq", "dkv", "dsink", "dentries"), g_p, g_x):
            row[f"err_{impl}_{label}"] = rel(a, b)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", default="a-csa,a-hca,b-csa,b-hca")
    args = ap.parse_args()
    # jax 0.11 deprecates the Pallas Triton backend with a warning at every lowering
    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for name in args.cases.split(","):
        t = time.perf_counter()
        rows.append(run_case(name, args.reps))
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t:.0f} s)", flush=True)
    head = f"{'case':8} {'impl':7} {'fwd ms':>9} {'fwd+bwd ms':>11} {'compile s':>10}"
    print(head)
    for r in rows:
        for impl in IMPLS:
            if f"{impl}_fwd_ms" not in r and f"{impl}_error" not in r:
                continue
            if f"{impl}_error" in r:
                print(f"{r['case']:8} {impl:7} FAILED: {r[f'{impl}_error'][:100]}")
            else:
                print(f"{r['case']:8} {impl:7} {r[f'{impl}_fwd_ms']:9.2f} {r[f'{impl}_fwd_bwd_ms']:11.2f} "
                      f"{r[f'{impl}_fwd_compile_s'] + r[f'{impl}_fwd_bwd_compile_s']:10.1f}")
        errs = {k[4:]: f"{v:.1e}" for k, v in r.items() if k.startswith("err_")}
        if errs:
            print(f"{'':8} vs xla (max |diff| / max |xla|): {errs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
