"""Profile one training step: device time by part of the model and the costliest device ops.

    python bench/profile_step.py --config configs/small.yaml --batch 8 --seq 2048

Compiles the full training step (as bench/long_context.py's ``train``), runs two steps, times
``--steps`` more (median step, tokens/s, MFU by ``v4jax.trainer.flops_per_token`` over 989 TFLOP/s,
peak memory), traces one with ``jax.profiler`` and reads the trace back (``jax.profiler.ProfileData``).
XLA's command buffers are turned off (``--xla_gpu_enable_command_buffer=``) unless
``--command-buffers``: a command buffer's kernels carry no op name, so they could not be charged. Every device op
is charged to the first of the model's ``jax.named_scope``s in its op path (attention, indexer,
compressor, mhc, moe, lm_head, optimizer; "other" when none), and the table lists the top (part, op)
pairs by total time with the first op path seen, then the "other" time by HLO instruction (the
copies and layout changes XLA adds have no op path; their computation and operands say where they
come from). ``--trace-dir`` keeps the trace for TensorBoard / XProf; ``--hlo-out F.gz`` writes the
compiled step's HLO text.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import yaml

SCOPES = ("indexer", "compressor", "attention", "mhc", "moe", "lm_head", "optimizer")
SKIP_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework Name Scope", "Framework Ops", "Source code")


def device_events(path: str, platform: str):
    """(name, duration_ns, op path) of every op event on the device planes of an xplane file."""
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(path)
    for plane in pd.planes:
        if platform == "gpu" and not plane.name.startswith("/device:GPU"):
            continue
        if platform == "cpu" and plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name in SKIP_LINES or (platform == "cpu" and not line.name.startswith("tf_XLA")):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                scope = str(stats.get("hlo_op") or stats.get("tf_op") or stats.get("long_name") or "")
                yield ev.name, ev.duration_ns, scope


def traced(fn, trace_dir: str | None = None):
    """Run ``fn`` under ``jax.profiler.trace`` -> (its result, the trace's xplane file)."""
    import jax

    trace_dir = trace_dir or tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        out = fn()
    return out, sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]


def time_by_op(path: str, platform: str) -> tuple[collections.Counter, collections.Counter]:
    """Device time (ns) and launches of each op name in an xplane file."""
    time_ns, calls = collections.Counter(), collections.Counter()
    for name, ns, _ in device_events(path, platform):
        time_ns[name] += ns
        calls[name] += 1
    return time_ns, calls


def op_paths(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op path (the jax name scopes), from the compiled module's text."""
    pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')
    return {m.group(1): m.group(2) for m in map(pat.match, hlo_text.splitlines()) if m}


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (the computation it is in, its text without metadata), so that ops
    XLA added itself (copies, layout changes: no op path) can still be told apart."""
    comp, out = "", {}
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = re.match(r"(?:ENTRY )?%?([\w.\-]+)", line)
            comp = m.group(1) if m else comp
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if m:
            out[m.group(1)] = (comp, m.group(2).split(", metadata=")[0][:240])
    return out


def scope_of(path: str) -> str:
    for s in SCOPES:
        if s in path:
            return s
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--batch", type=int, default=8, help="rows per optimizer update")
    ap.add_argument("--accum", type=int, default=1, help="train.grad_accum_steps: micro-batches of batch/accum rows")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attention", default="xla", help="parallel.attention_kernel: xla or pallas")
    ap.add_argument("--command-buffers", action="store_true", help="keep XLA's command buffers on")
    ap.add_argument("--json", default=None, help="write the figures and the tables here")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers (parallel.scan_layers=false)")
    ap.add_argument("--unroll-stages", type=int, default=None, help="parallel.unroll_stages (default: its default)")
    ap.add_argument("--parallel", action="append", default=[], metavar="FIELD=VALUE",
                    help="set a ParallelConfig field (value parsed as YAML), e.g. attention_chunk=2048; repeatable")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--per-part", type=int, default=6, help="also list this many top ops of each part")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--tree", default=None, help="import v4jax from this checkout")
    ap.add_argument("--hlo-out", default=None, help="write the compiled step's HLO text here (gzip)")
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    if not args.command_buffers:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
    sys.path.insert(0, os.path.dirname(__file__))
    import jax
    import jax.numpy as jnp
    import long_context
    import numpy as np

    import v4jax.layers
    import v4jax.model
    import v4jax.scan
    import v4jax.trainer
    from v4jax.config import model_config_from_yaml
    from v4jax.parallel import ParallelConfig

    config = model_config_from_yaml(args.config)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=config.layer_types[: args.layers])
    fields = {"moe_backend": args.backend, "remat": args.remat, "scan_layers": not args.no_scan,
              **({"attention_kernel": args.attention} if args.attention != "xla" else {}),
              **({"unroll_stages": args.unroll_stages} if args.unroll_stages is not None else {})}
    for item in args.parallel:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--parallel {item!r}: use FIELD=VALUE, e.g. attention_chunk=2048")
        fields[name] = yaml.safe_load(value)
    par = ParallelConfig(**fields)
    cfg = v4jax.trainer.TrainConfig(steps=1000, dtype="bfloat16", grad_accum_steps=args.accum)
    opt = v4jax.trainer.make_optimizer(cfg, config)
    state = v4jax.trainer.init_state(long_context.device_params(v4jax, config, jnp.float32, par.scan_layers), opt)
    data = jax.device_put(long_context.synthetic_batch(config, args.batch, args.seq))
    step = v4jax.trainer.make_train_step(config, cfg, opt, par)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    print(f"compile {compile_s:.1f} s", flush=True)
    losses, oks, times = [], [], []
    for i in range(2 + args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
        oks.append(bool(m["ok"]))
    step_s = float(np.median(times[2:]))
    tps = args.batch * args.seq / step_s
    mfu = v4jax.trainer.flops_per_token(config, args.seq) * tps / 989e12
    print(f"step {step_s:.3f} s (spread {max(times[2:]) - min(times[2:]):.3f}), {tps:,.0f} tokens/s, MFU {mfu:.1%}; "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {sum(oks)}/{len(oks)} steps applied", flush=True)
    t0 = time.perf_counter()
    (state, m), path = traced(lambda: jax.block_until_ready(compiled(state, data)), args.trace_dir)
    wall = time.perf_counter() - t0
    platform = jax.devices()[0].platform
    by_scope, by_op, paths, counts = (collections.Counter(), collections.Counter(), {}, collections.Counter())
    unscoped, unscoped_calls = collections.Counter(), collections.Counter()  # "other" by HLO instruction
    other_by_comp = collections.Counter()  # "other" by the computation (loop body) its instruction is in
    copies = collections.Counter()  # device-to-device copies by HLO op name
    hlo_text = compiled.as_text()
    if args.hlo_out:
        with gzip.open(args.hlo_out, "wt") as f:
            f.write(hlo_text)
    hlo_paths, instructions = op_paths(hlo_text), hlo_instructions(hlo_text)
    for name, ns, hlo_op in device_events(path, platform):
        scope = hlo_paths.get(hlo_op, hlo_paths.get(name, hlo_op))
        part = scope_of(scope)
        by_scope[part] += ns
        by_op[part, name] += ns  # one kernel (a cuBLAS GEMM, a copy) serves many ops: split it by part
        counts[part, name] += 1
        paths.setdefault((part, name), scope)
        if part == "other":
            unscoped[hlo_op] += ns
            unscoped_calls[hlo_op] += 1
            comp, text = instructions.get(hlo_op, ("?", ""))
            if name == "MemcpyD2D":
                copies[hlo_op] += ns
            other_by_comp[comp, name if name == "MemcpyD2D" else "kernels", text.split(" ")[0][:60]] += ns
    total = sum(by_scope.values())
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    print(f"\nstep wall {wall:.3f} s (traced); device op time {total / 1e9:.3f} s; loss {float(m['loss']):.3f}; "
          f"peak {peak:.1f} GiB; dropped {int(m['dropped_tokens'])}")
    print(f"\n{'part':<12} {'ms':>10} {'share':>7}")
    for s, ns in by_scope.most_common():
        print(f"{s:<12} {ns / 1e6:10.1f} {ns / max(total, 1):7.1%}")
    print(f"\n{'ms':>9} {'calls':>6}  part: op  (first op path)")
    for key, ns in by_op.most_common(args.top):
        print(f"{ns / 1e6:9.2f} {counts[key]:6d}  {key[0]}: {key[1][:60]}  ({paths[key][-110:]})")
    for part, _ in by_scope.most_common():
        ops = [(key, ns) for key, ns in by_op.most_common() if key[0] == part][: args.per_part]
        print(f"\n{part}: " + "; ".join(f"{key[1][:48]} {ns / 1e6:.2f} ms x{counts[key]}" for key, ns in ops))
    print(f"\n{'ms':>9}  'other' by computation, copies or kernels, result shape")
    for (comp, kind, shape), ns in other_by_comp.most_common(args.top):
        print(f"{ns / 1e6:9.2f}  {comp[:60]}  {kind}  {shape}")
    print(f"\ndevice-to-device copies: {len(copies)} ops, {sum(copies.values()) / 1e6:.1f} ms; the costliest:")
    for op, ns in copies.most_common(12):
        comp, text = instructions.get(op, ("?", "(not in the compiled HLO text)"))
        print(f"{ns / 1e6:9.2f}  {op} in {comp}: {text[:160]}")
    print(f"\n{'ms':>9} {'calls':>6}  'other' by HLO instruction: computation, instruction")
    for op, ns in unscoped.most_common(args.top):
        comp, text = instructions.get(op, ("?", "?"))
        print(f"{ns / 1e6:9.2f} {unscoped_calls[op]:6d}  {op} in {comp}: {text[:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "batch": args.batch, "accum": args.accum, "seq": args.seq,
                       "backend": args.backend,
                       "attention": args.attention, "scan": not args.no_scan, "unroll_stages": par.unroll_stages,
                       "xla_flags": os.environ.get("XLA_FLAGS", ""), "parallel": dataclasses.asdict(par),
                       "tree": args.tree or ".", "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                       "compile_s": compile_s, "step_s": step_s, "step_times": times, "tokens_per_s": tps, "mfu": mfu,
                       "peak_gib": peak, "dropped": int(m["dropped_tokens"]), "losses": losses, "ok": oks,
                       "traced_wall_s": wall, "device_op_s": total / 1e9,
                       "by_scope_ms": {k: v / 1e6 for k, v in by_scope.most_common()},
                       "top_ops": [[part, name, ns / 1e6, counts[part, name], paths[part, name]]
                                   for (part, name), ns in by_op.most_common(args.top)],
                       "other_by_instruction": [[op, ns / 1e6, unscoped_calls[op], *instructions.get(op, ("?", "?"))]
                                                for op, ns in unscoped.most_common(args.top)],
                       "other_by_computation": [[*key, ns / 1e6] for key, ns in other_by_comp.most_common(args.top)],
                       "part_ops": [[part, name, ns / 1e6, counts[part, name]]
                                    for (part, name), ns in by_op.most_common() if ns > 2e5]},
                      f, indent=1)


if __name__ == "__main__":
    main()
