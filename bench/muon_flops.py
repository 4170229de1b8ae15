"""Compile-only: Muon's Newton-Schulz work per device on a mesh of fake CPU devices, against one device.

    python bench/muon_flops.py [--config configs/bench-flash-8l.yaml] [--devices 64]
        [--mesh fsdp=16,expert=4 --mesh data=4,fsdp=4,expert=4 ...] [--ns-dtype bfloat16]

For each mesh it compiles the orthogonalisation of every Muon leaf (the Newton-Schulz part of the
optimizer: normalise, 10 steps, rescale) twice: spread over the mesh (``mesh=`` given, what
train.py does) and as before (``mesh=None``: the same program on sharded inputs, partitioned by
XLA). It prints XLA's cost-analysis FLOPs per device x devices / the one-device program's FLOPs
(ideal 1) and the bytes the collectives move per device and update (from the compiled HLO).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bench-flash-8l.yaml")
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--mesh", action="append", default=None, help="axis=size,... (default: the issue's two)")
    p.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--before", action="store_true", help="also compile without mesh= (XLA's own partitioning)")
    return p.parse_args(argv)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"(f32|bf16|f16|s32|u32|f64|s8|u8|pred)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in a compiled (per-device) HLO module."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        size = 0
        for dt, dims in _SHAPE.findall(m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _DTYPE_BYTES[dt]
        out[m.group(2)] = out.get(m.group(2), 0) + size
    return out


def muon_tree(config):
    """The Muon leaves of the model (scan layout) as ShapeDtypeStructs, their row blocks by keystr."""
    import jax

    from v4jax.model import param_specs
    from v4jax.optim import MUON, muon_row_blocks, param_labels

    specs = param_specs(config, scan=True)
    labels = param_labels(specs, config)
    muon = jax.tree.map(lambda x, lab: x if lab == MUON else None, specs, labels)
    return muon, muon_row_blocks(specs, config)


def ns_program(config, mesh, spread: bool, ns_dtype):
    """(jitted orthogonalisation, its argument) for the Muon leaves on ``mesh`` (None: one device)."""
    import jax

    from v4jax.optim import scale_by_hybrid_newton_schulz
    from v4jax.schema import param_shardings

    muon, blocks = muon_tree(config)
    if mesh is None:
        tx = scale_by_hybrid_newton_schulz(ns_dtype=ns_dtype, row_blocks=blocks)
        return jax.jit(lambda u: tx.update(u, None)[0]), muon
    shardings = param_shardings(muon, mesh, config)
    layouts = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    tx = scale_by_hybrid_newton_schulz(ns_dtype=ns_dtype, row_blocks=blocks, mesh=mesh if spread else None,
                                       shardings=layouts)
    args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), muon, shardings)
    return jax.jit(lambda u: tx.update(u, None)[0], out_shardings=shardings), args


def measure(config, mesh, spread, ns_dtype) -> dict:
    fn, args = ns_program(config, mesh, spread, ns_dtype)
    t = time.perf_counter()
    compiled = fn.lower(args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": float(cost["flops"]), "collective_bytes": collective_bytes(compiled.as_text()),
            "compile_s": time.perf_counter() - t}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp

    from v4jax.config import ModelConfig
    from v4jax.parallel import ParallelConfig, make_mesh

    config = ModelConfig.from_yaml(args.config)
    ns = jnp.bfloat16 if args.ns_dtype == "bfloat16" else jnp.float32
    meshes = args.mesh or ["fsdp=16,expert=4", "data=4,fsdp=4,expert=4"]
    one = measure(config, None, False, ns)
    print(f"{args.config}: one device {one['flops'] / 1e12:.2f} TFLOP per update "
          f"(compile {one['compile_s']:.0f} s)", flush=True)
    for text in meshes:
        sizes = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
        sizes.setdefault("data", 1)
        mesh = make_mesh(ParallelConfig(**sizes), jax.devices()[:args.devices])
        for spread in ((True, False) if args.before else (True,)):
            r = measure(config, mesh, spread, ns)
            ratio = r["flops"] * mesh.size / one["flops"]
            coll = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(r["collective_bytes"].items())) or "none"
            print(f"  {text:24s} {'spread' if spread else 'before':6s}: per-device FLOPs x {mesh.size} / one "
                  f"device = {ratio:.2f}; collectives per device {coll} (compile {r['compile_s']:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
