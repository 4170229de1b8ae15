"""Per-device memory of the training step for a config and mesh, from an ahead-of-time compile.

    python bench/aot_memory.py --config configs/small.yaml --devices 8 --mesh fsdp=8 --batch 8 --seq 2048

``--layers N`` keeps the config's first N layers (to show how compile time grows with depth);
``--no-scan`` compiles the unrolled per-layer loop instead of the scanned layers.

Besides XLA's memory analysis it reports (JSON fields ``cost``, ``target``, ``step_time``,
``collective_bytes_per_device``): XLA's cost analysis of the compiled step (FLOPs, bytes accessed),
a step time estimated as max(FLOPs / the chip's peak bf16 FLOP/s, bytes / its HBM bandwidth), and
the bytes each kind of collective returns per device and step, counted from the compiled HLO
(``bench/muon_flops.collective_bytes``). XLA's cost analysis counts a while loop's body once, and
the step's scanned layers, chunked attention and loss, and Sinkhorn iterations are while loops:
``hlo_loop_counts`` walks the compiled HLO's call graph, multiplies each computation by the trip
counts of the loops around it (``known_trip_count``), and the reported FLOPs and bytes are the cost
analysis's figures scaled by the ratio of the walk's dot FLOPs (top-level bytes) counted with and
without the trip counts. The raw figures are kept beside them.

Nothing is allocated: parameters, optimizer state and batch are abstract. ``--devices N`` compiles for
N fake CPU devices (the CPU backend's memory analysis); on a GPU/TPU host leave it out to use the
real devices; ``--mock-gpus N`` (on a host with a GPU) compiles for N GPUs of that kind through
jax's mock GPU topology; ``--tpu-topology`` compiles for a TPU slice from any host with libtpu:

    pip install -r requirements-tpu.txt   # in a separate virtual environment: jax[tpu] brings libtpu
    python bench/aot_memory.py --config configs/v4-flash.yaml --tpu-topology v5p:8x8x4 --mesh fsdp=16,expert=16 \
        --batch 256 --seq 4096 --remat full
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import sys
import time

# Per-chip peaks the step-time estimate divides by: dense bf16 FLOP/s, HBM bytes/s, HBM bytes.
# Sources (checked 2026-12-06): cloud.google.com/tpu/docs/v5p and /v6e (TPU v5p: 459 TFLOP/s bf16,
# 2765 GB/s, 95 GB HBM; Trillium v6e: 918 TFLOP/s bf16, 1638 GB/s, 32 GB HBM); NVIDIA's H200
# datasheet (989 TFLOP/s dense bf16, i.e. 1979 with sparsity; 4.8 TB/s; 141 GB). Keyed by the
# device_kind jax reports.
PEAKS = {
    "TPU v5 lite": {"bf16_flops": 197e12, "hbm_bytes_per_s": 819e9, "hbm_bytes": 16 * 2**30},  # v5e
    "TPU v5": {"bf16_flops": 459e12, "hbm_bytes_per_s": 2765e9, "hbm_bytes": 95 * 2**30},  # v5p ("TPU v5")
    "TPU v6 lite": {"bf16_flops": 918e12, "hbm_bytes_per_s": 1638e9, "hbm_bytes": 32 * 2**30},  # v6e
    "NVIDIA H200": {"bf16_flops": 989e12, "hbm_bytes_per_s": 4.8e12, "hbm_bytes": 141e9},
    "NVIDIA H100": {"bf16_flops": 989e12, "hbm_bytes_per_s": 3.35e12, "hbm_bytes": 80e9},
}


def peaks_for(device_kind: str) -> dict | None:
    for name, p in PEAKS.items():
        if device_kind.startswith(name):
            return dict(p, name=name)
    return None


# ---- The compiled HLO's call graph, with while-loop trip counts ----------------------------------

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation|branch_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SHAPE = re.compile(r"(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "iota"}


def _split_type(rest: str) -> tuple[str, str, str]:
    """'TYPE opcode(operands), attrs' -> (TYPE, opcode, the text after 'opcode(')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        typ, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        typ, _, rest = rest.partition(" ")
    op, _, args = rest.partition("(")
    return typ, op.strip(), args


def _dims(shape_text: str) -> list[list[int]]:
    return [[int(d) for d in dims.split(",") if d] for _, dims in _SHAPE.findall(shape_text)]


def _nbytes(shape_text: str) -> float:
    return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _SHAPE.findall(shape_text))


def _operands(args: str) -> list[str]:
    depth, cur, out = 0, "", []
    for ch in args:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            if depth == 0:
                out.append(cur)
                break
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [o.strip().split()[-1].lstrip("%") for o in out if o.strip()]


def _attr_dims(args: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", args)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(op: str, typ: str, args: str, shapes: dict) -> float:
    """2 x output elements x contracted size, for dot, ragged-dot and convolution."""
    out = _dims(typ)
    if not out:
        return 0.0
    out_n = math.prod(out[0])
    ops = _operands(args)
    lhs = _dims(shapes.get(ops[0], "")) if ops else []
    if op in ("dot", "ragged-dot") and lhs:
        k = math.prod(lhs[0][i] for i in _attr_dims(args, "lhs_contracting_dims")) or 1
        if op == "ragged-dot" and len(out[0]) > len(lhs[0]):  # [g, n, k] from rows contracted by group
            k = k / out[0][0]
        return 2.0 * out_n * k
    if op == "convolution" and len(ops) > 1:  # XLA:TPU writes dot_generals as 1-d convolutions
        rhs = _dims(shapes.get(ops[1], ""))
        m = re.search(r"dim_labels=[^_]*_([^-]*)->", args)
        if rhs and m and "i" in m.group(1):  # a batch dim as a padded window: one tap per output
            return 2.0 * out_n * rhs[0][m.group(1).index("i")]
    return 0.0


def _tuple_elements(typ: str) -> list[str]:
    depth, cur, out = 0, "", []
    for ch in typ[1:-1]:
        depth += ch in "({["
        depth -= ch in ")}]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def _result_only(item) -> str:
    """The instruction's line for ``collective_bytes``, except that an async all-gather-start or
    collective-permute-start, whose tuple holds (operands, results[, contexts]), keeps only its
    results (all-reduce-start returns its results alone)."""
    name, typ, op, args, line = item
    if op in ("all-gather-start", "collective-permute-start") and typ.startswith("("):
        return f"  %{name} = {_tuple_elements(typ)[1]} {op}({args}"
    return line


def _condition_bound(args: str, parsed: dict) -> int | None:
    """Trip count of a while loop whose condition is ``counter < constant`` (jax's scans and
    fori_loops count from 0 by 1; XLA:TPU leaves no known_trip_count): the constant; else None."""
    c = re.search(r"condition=%?([\w.\-]+)", args)
    items = parsed.get(c.group(1), []) if c else []
    consts = {n: re.match(r"\s*(-?\d+)\)", a) for n, typ, op, a, _ in items if op == "constant"}
    for _, _, op, a, line in items:
        if op == "compare" and "direction=LT" in a and line.lstrip().startswith("ROOT"):
            ops = _operands(a)
            if len(ops) == 2 and consts.get(ops[1]):
                return int(consts[ops[1]].group(1))
    return None


def hlo_loop_counts(hlo: str) -> dict:
    """Walk the compiled HLO module from its entry: each computation is weighted by how many times
    it runs per step (the product of the known trip counts of the while loops around it; fusions,
    calls and conditional branches inherit their caller's weight, every branch counted). Returns the
    dot FLOPs and the top-level bytes (operands + results of every non-fused instruction that moves
    data), each summed once per computation (as XLA's cost analysis does) and weighted; the
    collective bytes by kind likewise (``muon_flops.collective_bytes`` per computation); and the
    while loops found with their trip counts."""
    from muon_flops import collective_bytes  # noqa: PLC0415 (bench/, beside this script)

    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        h = _HEADER.match(line)
        if h:
            name = h.group(2)
            comps[name] = []
            if h.group(1):
                entry = name
            continue
        if line.rstrip() == "}":  # (a custom call's backend config may span lines starting with "}")
            name = None
        elif name is not None:
            comps[name].append(line)
    parsed, shapes = {}, {}
    for cname, lines in comps.items():
        items = []
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            typ, op, args = _split_type(m.group(2))
            shapes[m.group(1)] = typ
            items.append((m.group(1), typ, op, args, line))
        parsed[cname] = items
    # A computation's weight is the sum over its call sites of the caller's weight x the site's
    # multiplicity, so callers are summed before callees: reverse DFS post-order from the entry.
    loops = []
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    for cname, items in parsed.items():
        out = []
        for _, _, op, args, _ in items:
            trip = 1
            if op == "while":
                t = _TRIP.search(args)
                trip = int(t.group(1)) if t else _condition_bound(args, parsed)
                b = re.search(r"body=%?([\w.\-]+)", args)
                loops.append({"computation": cname, "body": b.group(1) if b else None, "trip_count": trip})
            for key, val in _CALLEE.findall(args):
                if key == "to_apply":
                    continue  # scalar reducers: counted in their instruction's bytes, no dots
                for callee in re.findall(r"[\w.\-]+", val):
                    if callee not in parsed:
                        continue
                    mult = (trip or 1) if key == "body" else ((trip or 1) + 1 if key == "condition" else 1)
                    out.append((callee, mult, op == "fusion" and key == "calls"))
        edges[cname] = out
    post, state = [], {}

    def visit(c):
        stack = [(c, iter(edges.get(c, ())))]
        state[c] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                post.append(node)
                continue
            if nxt[0] not in state:
                state[nxt[0]] = 1
                stack.append((nxt[0], iter(edges.get(nxt[0], ()))))

    visit(entry)
    weight = {c: 0 for c in post}
    weight[entry] = 1
    fused_only = {c: True for c in post}
    fused_only[entry] = False
    for c in reversed(post):  # callers before callees
        for callee, mult, is_fusion in edges.get(c, ()):
            weight[callee] += weight[c] * mult
            if not is_fusion:
                fused_only[callee] = False
    totals = {"dot_flops_once": 0.0, "dot_flops": 0.0, "bytes_once": 0.0, "bytes": 0.0}
    coll_once, coll = {}, {}
    for c in post:
        w = weight[c]
        f = b = 0.0
        for _, typ, op, args, _ in parsed[c]:
            f += _dot_flops(op, typ, args, shapes)
            if not fused_only[c] and op not in _NO_TRAFFIC and not op.endswith("-done"):
                b += _nbytes(typ) + sum(_nbytes(shapes.get(o, "")) for o in _operands(args))
        totals["dot_flops_once"] += f
        totals["dot_flops"] += f * w
        totals["bytes_once"] += b
        totals["bytes"] += b * w
        if not fused_only[c]:
            for kind, v in collective_bytes("\n".join(_result_only(x) for x in parsed[c])).items():
                coll_once[kind] = coll_once.get(kind, 0) + v
                coll[kind] = coll.get(kind, 0) + v * w
    totals.update(collective_bytes_once=coll_once, collective_bytes=coll,
                  while_loops=[dict(lp, runs=weight.get(lp["computation"], 0)) for lp in loops
                               if lp["computation"] in weight])
    return totals


def step_cost(cost: dict, hlo: str, device_kind: str, model_flops_per_device: float) -> dict:
    """From XLA's cost analysis of the compiled step (``compiled.cost_analysis()``) and its HLO text:
    the loop-weighted figures, the step-time estimate and the collective bytes."""
    cost = cost[0] if isinstance(cost, list) else cost
    flops_raw, bytes_raw = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    walk = hlo_loop_counts(hlo)
    f_ratio = walk["dot_flops"] / walk["dot_flops_once"] if walk["dot_flops_once"] else 1.0
    b_ratio = walk["bytes"] / walk["bytes_once"] if walk["bytes_once"] else 1.0
    flops, nbytes = flops_raw * f_ratio, bytes_raw * b_ratio
    out = {
        "cost": {"flops_per_device_raw": flops_raw, "bytes_accessed_per_device_raw": bytes_raw,
                 "hlo_dot_flops_once": walk["dot_flops_once"], "hlo_dot_flops_weighted": walk["dot_flops"],
                 "hlo_bytes_once": walk["bytes_once"], "hlo_bytes_weighted": walk["bytes"],
                 "loop_ratio_flops": f_ratio, "loop_ratio_bytes": b_ratio,
                 "flops_per_device": flops, "bytes_accessed_per_device": nbytes,
                 "model_flops_per_device": model_flops_per_device,
                 "while_loops": walk["while_loops"]},
        "collective_bytes_per_device": {k: int(v) for k, v in sorted(walk["collective_bytes"].items())},
        "collective_bytes_per_device_loop_body_once": {k: int(v) for k, v in
                                                       sorted(walk["collective_bytes_once"].items())},
    }
    peak = peaks_for(device_kind)
    if peak:
        t_flops, t_bytes = flops / peak["bf16_flops"], nbytes / peak["hbm_bytes_per_s"]
        t = max(t_flops, t_bytes)
        out["target"] = peak
        out["step_time"] = {"estimate_s": t, "compute_s": t_flops, "memory_s": t_bytes,
                            "bound": "compute" if t_flops >= t_bytes else "memory",
                            "mfu_implied": model_flops_per_device / (t * peak["bf16_flops"]) if t else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--devices", type=int, default=None, help="fake CPU devices to compile for")
    ap.add_argument("--mesh", default="data=-1", help="e.g. fsdp=4,expert=2 (the rest 1; one may be -1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--backend", default="auto",
                    help="grouped matmul: auto (the default, resolved for the target's devices: tokamax on a "
                         "TPU or Hopper/Blackwell GPU where tokamax is installed, else ragged_dot), ragged_dot, "
                         "tokamax, or padded (XLA:CPU lowers ragged_dot to a dense per-expert product, so on "
                         "fake CPU devices padded is the realistic one)")
    ap.add_argument("--attention-kernel", default="xla", help="parallel.attention_kernel: xla (default) or pallas")
    ap.add_argument("--expert-over-context", action="store_true",
                    help="parallel.expert_over_context: the routed experts split over expert x context")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers instead of jax.lax.scan")
    ap.add_argument("--mock-gpus", type=int, default=None,
                    help="compile for N GPUs of the first local GPU's kind (jax's mock GPU topology, 1 x N x 1)")
    ap.add_argument("--tpu-topology", default=None,
                    help="compile for a TPU slice that is not here, e.g. v5p:8x8x4 (needs jax[tpu], i.e. libtpu)")
    ap.add_argument("--muon-unspread", action="store_true",
                    help="diagnostic: Muon's Newton-Schulz partitioned by XLA (make_optimizer without the mesh, as "
                         "before 2026-12-06) instead of spread over the mesh as train.py does")
    ap.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    ap.add_argument("--hlo-out", default=None, help="write the compiled HLO text here (gzip if it ends in .gz)")
    ap.add_argument("--reanalyse", default=None, metavar="REPORT.json",
                    help="recompute the cost, step-time and collective fields of an earlier report from its raw "
                         "cost analysis and the HLO it saved (--hlo-out names that file); no compile")
    args = ap.parse_args()
    if args.reanalyse:
        with open(args.reanalyse) as f:
            report = json.load(f)
        with (gzip.open if args.hlo_out.endswith(".gz") else open)(args.hlo_out, "rt") as f:
            hlo = f.read()
        c = report["cost"]
        raw = {"flops": c["flops_per_device_raw"], "bytes accessed": c["bytes_accessed_per_device_raw"]}
        report.update(step_cost(raw, hlo, report["device_kind"], c["model_flops_per_device"]))
        report["reanalysed"] = True
        with open(args.json_out or args.reanalyse, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        print(summary(report))
        return
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.mock_gpus:  # N mock hosts of one GPU each; the real GPU is only asked for its kind
        os.environ.update(CUDA_VISIBLE_DEVICES="0", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    if args.mock_gpus:  # through jax.config: jax 0.11.2 ignored the JAX_MOCK_GPU_TOPOLOGY variable
        jax.config.update("jax_mock_gpu_topology", f"1x{args.mock_gpus}x1")
    from v4jax import devices as v4devices
    from v4jax import memory, moe
    from v4jax.config import model_config_from_yaml
    from v4jax.memory import training_memory
    from v4jax.model import param_count
    from v4jax.parallel import ParallelConfig, make_mesh
    from v4jax.trainer import TrainConfig, flops_per_token

    sizes = {"data": 1}
    for item in args.mesh.split(","):
        k, v = item.split("=")
        sizes[k] = int(v)
    config = model_config_from_yaml(args.config)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=config.layer_types[:args.layers],
                                num_hash_layers=min(config.num_hash_layers, args.layers))
    t = time.perf_counter()
    devices = None
    if args.tpu_topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices
        # The kernels are chosen for v4jax.devices.current(), which on this host is the CPU: stand in
        # the target's chips, as a run on the slice would see them (as the tests do for GPUs).
        target = v4devices.Accelerator("tpu", devices[0].device_kind)
        v4devices.current = lambda: target
    backend = moe.resolve_backend(args.backend, v4devices.current())
    par = ParallelConfig(**sizes, remat=args.remat, capacity_factor=2.0, scan_layers=not args.no_scan,
                         moe_backend=args.backend, attention_kernel=args.attention_kernel,
                         expert_over_context=args.expert_over_context)
    mesh = make_mesh(par, devices)
    # training_memory compiles the step and keeps only the memory analysis: catch the compiled step
    # on its way out for the cost analysis and the HLO.
    caught = {}
    make_step = memory.make_train_step

    def catching_make_train_step(*a, **k):
        step = make_step(*a, **k)

        class Lowered:
            def __init__(self, lowered):
                self.lowered = lowered

            def compile(self):
                caught["compiled"] = self.lowered.compile()
                return caught["compiled"]

        class Step:
            def lower(self, *a2, **k2):
                return Lowered(step.lower(*a2, **k2))

        return Step()

    memory.make_train_step = catching_make_train_step
    if args.muon_unspread:
        make_opt = memory.make_optimizer
        memory.make_optimizer = lambda cfg, config, mesh=None: make_opt(cfg, config)
    device_kind = mesh.devices.flat[0].device_kind
    try:
        report = training_memory(config, TrainConfig(dtype=args.dtype), par, mesh, args.batch, args.seq)
    except Exception as e:  # noqa: BLE001 (XLA:TPU refuses a program whose buffers exceed HBM: say by how much)
        report = {"devices": mesh.size, "mesh": dict(mesh.shape), "batch_size": args.batch, "seq_len": args.seq,
                  "compile_error": f"{type(e).__name__}: {e}"[:50000]}
        m = re.search(r"required for ([\w ]+?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if m:  # XLA:TPU's figures are binary gigabytes
            report.update(required_what=m.group(1), required_bytes_per_device=int(float(m.group(2)) * 2**30),
                          available_hbm_bytes=int(float(m.group(3)) * 2**30))
    compile_s = time.perf_counter() - t
    report.update(config=args.config, layers=config.num_hidden_layers, scan=par.scan_layers, backend=args.backend,
                  backend_resolved=backend, attention_kernel=args.attention_kernel,
                  tokamax_installed=moe.tokamax_installed(), kernels=v4devices.describe(par).split("; ", 1)[1],
                  params=param_count(config)["total"], compile_s=compile_s, remat=args.remat,
                  dtype=args.dtype, device_kind=device_kind, jax=jax.__version__, target_topology=args.tpu_topology,
                  mock_gpus=args.mock_gpus, muon_spread=not args.muon_unspread,
                  expert_over_context=args.expert_over_context)
    import importlib.metadata as md  # noqa: PLC0415

    if any(d.metadata["Name"] == "libtpu" for d in md.distributions()):
        report["libtpu"] = md.version("libtpu")
    if "compile_error" in report:
        text = json.dumps(report, indent=2)
        print(text)
        if args.json_out:
            with open(args.json_out, "w") as f:
                f.write(text + "\n")
        print(f"compile failed after {compile_s:.0f} s: {report['compile_error']}")
        sys.exit(1)
    t = time.perf_counter()
    hlo = caught["compiled"].as_text()
    if args.hlo_out:
        with (gzip.open if args.hlo_out.endswith(".gz") else open)(args.hlo_out, "wt") as f:
            f.write(hlo)
    model_flops = flops_per_token(config, args.seq) * args.batch * args.seq / mesh.size
    report.update(step_cost(caught["compiled"].cost_analysis(), hlo, device_kind, model_flops))
    report["analysis_s"] = time.perf_counter() - t
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(summary(report))


def summary(report: dict) -> str:
    gib = 2**30
    lines = [(f"per device: arguments {report['argument_bytes_per_device'] / gib:.2f} GiB, temporaries "
              f"{report['temp_bytes_per_device'] / gib:.2f} GiB, peak estimate "
              f"{report['peak_estimate_bytes_per_device'] / gib:.2f} GiB")]
    c = report["cost"]
    lines.append(f"cost per device: {c['flops_per_device'] / 1e12:.2f} TFLOP, "
                 f"{c['bytes_accessed_per_device'] / 1e9:.1f} "
                 f"GB accessed (raw cost analysis: {c['flops_per_device_raw'] / 1e12:.2f} TFLOP, "
                 f"{c['bytes_accessed_per_device_raw'] / 1e9:.1f} GB; loop ratios {c['loop_ratio_flops']:.2f}, "
                 f"{c['loop_ratio_bytes']:.2f}); model {c['model_flops_per_device'] / 1e12:.2f} TFLOP")
    if "step_time" in report:
        st, tg = report["step_time"], report["target"]
        fits = "fits" if report["peak_estimate_bytes_per_device"] <= tg["hbm_bytes"] else "DOES NOT FIT"
        lines.append(f"{tg['name']}: HBM {tg['hbm_bytes'] / gib:.1f} GiB ({fits}); step estimate "
                     f"{st['estimate_s']:.3f} s ({st['bound']}-bound: compute {st['compute_s']:.3f} s, memory "
                     f"{st['memory_s']:.3f} s), implied MFU {st['mfu_implied']:.1%}")
    coll = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in report["collective_bytes_per_device"].items()) or "none"
    lines.append(f"collectives per device and step: {coll}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
