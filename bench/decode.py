"""Inference on one device: prefill and decode speed against the memory-bandwidth floor, and the cache.

    python bench/decode.py --config configs/bench-flash-8l.yaml --contexts 8192 --batches 1,32 --steps 64
    python bench/decode.py ... --peer-only      # transformers' generate, batch 1, same shapes (own process)
    python bench/decode.py ... --weights bf16,kept   # also with the weights kept FP8/FP4 (schema.as_stored)
    python bench/decode.py ... --speculative     # also MTP self-speculative decoding
    python bench/decode.py ... --profile         # also a traced decode: device time by op
    python bench/decode.py ... --grouped-decode  # also batch 1 with the grouped matmul for the experts
    python bench/decode.py ... --mhc-xla         # also each batch with mHC in XLA instead of its kernels

For each context C, a prompt of C random tokens is prefilled (``v4jax.generate.prefill``, chunks of
``--prefill-chunk``) twice on fresh caches: the first prefill in the process includes compiling
(what a user's first request waits for; ``first_prefill_s``, with the programs compiled during it),
the second is the steady state. Then for each batch size the cache is tiled to that many rows and
decoded greedily. The rows share the prompt but each starts from a token of its own (drawn at
random, distinct), so they route differently, as a batch of users would: rows that were copies of
one another (this bench before 2026-12-07's afternoon) chose the same 6 experts per layer, and the
step read a tenth of the experts the floor below counted.

* ``device loop``: ``--steps`` tokens in one ``v4jax.generate.decode_tokens`` call (the token loop
  inside a jax.lax.while_loop, as ``generate`` runs it), timed after a compiling call;
* ``host loop``: the same program one step per call, reading each step's tokens on the host (how
  generation ran before the loop moved onto the device);
* with ``--speculative``: ``speculate_tokens`` (each step drafts with the MTP block and verifies with
  the main model) on a cache prefilled with the MTP block; random weights make the MTP block's
  drafts random, so the row gives the step time, the measured acceptance rate, and the acceptance
  rate at which speculation would break even with the device loop. A config without an MTP block
  gets one (random, like the rest; the plain rows do not read it).

The **floor** of a decode step is the bytes it must read over the HBM bandwidth (``--hbm-tbps``,
default the device's nominal): every weight but the routed experts and the embedding, the routed
experts the step's rows chose, b embedding rows, and the cache (window and compressor rings, and
the compressed entries and indexer keys of the context). The experts chosen are counted, not
assumed: after the device loop each row's tokens are run through ``v4jax.model.forward`` (one row
at a time) and the distinct experts the b rows chose at each decoded position are counted per MoE
layer (``experts_touched``: their mean share of a layer's experts; the uniform-routing expectation
1 - (1 - k/E)^b is printed beside it). The other rows of that batch size (host loop, grouped
experts, speculation) reuse the share. ``floor_fraction`` = floor / measured step time. bf16
parameters and cache, random weights drawn on the device; the cache's device memory is read from
the allocator next to ``cache_bytes``.

``--grouped-decode``: after the rest, the smallest batch's device loop again with the routed
experts through the grouped matmul (``v4jax.moe.GATHER_FEW_PAIRS`` off) instead of gathering the
chosen experts' weights (a copy of them every step), with ``--profile`` traced too.

``--mhc-xla``: each batch's device loop again with mHC's collapses in XLA's fusions
(``v4jax.mhc.USE_KERNEL`` off) instead of the two kernels of ``v4jax.mhc_kernel``, with
``--profile`` traced too.

``--profile``: after the timings, one device-loop decode per batch is traced (``jax.profiler``) and
the device ops are summed by name: time and launches per token, and the trace's idle share. Run it
with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` so kernels are seen one by one.

``--peer-only``: ``transformers``' DeepSeek-V4 (PyTorch eager, bf16, its dynamic cache) on the same
config, batch 1: prefill time (generate with one new token) and decode tokens/s ((generate with
steps + 1 new tokens - prefill) / steps). transformers cannot batch rows of different lengths for
this model (no left padding), so only batch 1, and only up to ``--peer-max-context``. Prints JSON
lines and a table; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

NOMINAL_TBPS = {"H100": 3.35, "H200": 4.8, "B200": 8.0}  # HBM bandwidth, TB/s (SXM parts)


def hf_peer(config, context, steps):
    import numpy as np
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf = DeepseekV4Config(**config.to_hf_dict())
    with torch.device("cuda"):  # initialise on the device: seconds, not a minute of CPU
        model = DeepseekV4ForCausalLM(hf).to(torch.bfloat16).eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, config.vocab_size, (1, context)), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    prefill = min(run(1) for _ in range(2))
    total = run(steps + 1)
    return {"prefill_s": prefill, "prefill_tokens_per_s": context / prefill,
            "decode_tokens_per_s": steps / max(total - prefill, 1e-9),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def step_bytes(params, cache, config, batch: int, touched: float, speculative: bool = False) -> dict:
    """Bytes one decode step of ``batch`` rows must read (module docstring): weights (of the routed
    experts the share ``touched``) and cache."""
    import jax

    weights = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = jax.tree_util.keystr(path)
        if "['mtp']" in keys and not speculative:
            continue
        n = sum(x.nbytes for x in jax.tree.leaves(leaf))
        if "['embed']" in keys:
            n = n * batch / config.vocab_size
        elif "['experts']" in keys:
            n = n * touched
        weights += n
    cache_b = sum(x.nbytes for x in jax.tree.leaves(cache))  # its rows hold the context (entries past it unread)
    return {"weights": weights, "cache": cache_b, "total": weights + cache_b}


def experts_touched(params, config, dtype, tokens, n: int) -> float:
    """The mean share of a layer's routed experts that the rows of tokens [b, L] chose at each of
    their last n positions (distinct experts over the b rows, per MoE layer and position), from the
    routing of ``v4jax.model.forward`` run one row at a time."""
    import jax
    import numpy as np

    from v4jax.model import forward

    route = jax.jit(lambda p, t: [info["idx"][0, -n:] for info in forward(p, t, config, dtype=dtype,
                                                                          logits=False)["routing"]])
    idx = np.stack([np.stack(route(params, tokens[r:r + 1])) for r in range(tokens.shape[0])], 1)  # [layers, b, n, k]
    distinct = [len(np.unique(idx[layer, :, t])) for layer in range(idx.shape[0]) for t in range(n)]
    return float(np.mean(distinct)) / config.n_routed_experts


def profile_ops(fn, platform: str, per: int) -> dict:
    """Run ``fn`` under jax.profiler and sum the device ops by name -> the top ops (time and launches
    per token, ``per`` tokens), the top (op, HLO instruction) pairs (the instruction from the
    event's ``hlo_op`` or op path: which copy or fusion of the program it is), the device-busy time
    per token and the trace's span."""
    sys.path.insert(0, os.path.dirname(__file__))
    from profile_step import device_events, traced

    time_ns, calls = collections.Counter(), collections.Counter()
    by_instr, instr_calls = collections.Counter(), collections.Counter()
    for name, ns, scope in device_events(traced(fn)[1], platform):
        time_ns[name] += ns
        calls[name] += 1
        by_instr[name, scope] += ns
        instr_calls[name, scope] += 1
    busy = sum(time_ns.values())
    top = [{"op": n, "us_per_token": t / per / 1e3, "launches_per_token": calls[n] / per}
           for n, t in time_ns.most_common(25)]
    top_instr = [{"op": n, "instruction": i, "us_per_token": t / per / 1e3,
                  "launches_per_token": instr_calls[n, i] / per} for (n, i), t in by_instr.most_common(40)]
    return {"device_busy_us_per_token": busy / per / 1e3, "launches_per_token": sum(calls.values()) / per,
            "top_ops": top, "top_instructions": top_instr}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--contexts", default="8192,131072")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--peer-only", action="store_true",
                    help="run only the peer (in its own process: JAX's preallocated pool leaves it no memory)")
    ap.add_argument("--peer-max-context", type=int, default=8192,
                    help="run the peer only up to this context (its attention is dense: O(context^2))")
    ap.add_argument("--weights", default="bf16",
                    help="bf16 and/or kept: the release's FP8 matrices and FP4 experts held as stored "
                    "(v4jax.schema.as_stored of the same random weights), decoded in each matmul")
    ap.add_argument("--speculative", action="store_true", help="also time MTP self-speculative decoding")
    ap.add_argument("--mhc-xla", action="store_true",
                    help="also each batch's device loop with mHC's collapses in XLA instead of v4jax.mhc_kernel")
    ap.add_argument("--host-loop", action="store_true", help="also time one step per call from the host")
    ap.add_argument("--profile", action="store_true", help="trace a device-loop decode per batch")
    ap.add_argument("--grouped-decode", action="store_true",
                    help="also the smallest batch with the experts' grouped matmul instead of gathered weights")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth for the floor (default: nominal)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from v4jax import mhc, moe
    from v4jax.config import model_config_from_yaml
    from v4jax.decode import cache_bytes, extend, init_cache
    from v4jax.generate import decode_tokens, prefill, speculate_tokens, start_speculation
    from v4jax.model import init_params
    from v4jax.sampling import sampling_params

    sys.path.insert(0, os.path.dirname(__file__))
    from timing import json_rows

    config = model_config_from_yaml(args.config)
    if args.speculative and config.num_nextn_predict_layers == 0:  # bench-flash-8l has none: add the block
        config = config.replace(num_nextn_predict_layers=1)
    dev = jax.devices()[0]
    tbps = args.hbm_tbps or next((v for k, v in NOMINAL_TBPS.items() if k in dev.device_kind), None)
    dt = jnp.bfloat16
    dense = None if args.peer_only else init_params(config, 0, dt)
    in_use = lambda: (dev.memory_stats() or {}).get("bytes_in_use", 0)  # noqa: E731
    rows, emit = json_rows(args.json)
    no_stops = jnp.zeros((0,), jnp.int32)

    def floor(params, cache, b, step_s, touched, speculative=False):
        nbytes = step_bytes(params, cache, config, b, touched, speculative)
        k, e = config.num_experts_per_tok, config.n_routed_experts
        out = {"step_bytes": nbytes["total"], "weight_bytes_read": nbytes["weights"], "experts_touched": touched,
               "experts_touched_uniform": 1 - (1 - k / e) ** b}
        if tbps:
            out.update(floor_s=nbytes["total"] / (tbps * 1e12), floor_fraction=nbytes["total"] / (tbps * 1e12) / step_s,
                       hbm_tbps=tbps)
        return out

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        return out, time.perf_counter() - t0

    chunk = args.prefill_chunk
    rng = np.random.default_rng(0)
    for context, weights in ((c, w) for c in sorted(int(c) for c in args.contexts.split(","))
                             for w in args.weights.split(",")):
        max_len = context + 2 * args.steps + 128
        base = {"device": dev.device_kind, "jax": jax.__version__, "config": args.config, "context": context,
                "weights": weights}
        params = dense
        if weights == "kept" and not args.peer_only:
            from v4jax.schema import as_stored

            params = jax.jit(lambda p: as_stored(p, config))(dense)
        base["weight_bytes"] = sum(a.nbytes for a in jax.tree.leaves(params))
        try:
            if args.peer_only:
                raise StopIteration
            jax.block_until_ready(params)
            prompt = [list(rng.integers(3, config.vocab_size, context))]
            lengths = np.array([context])

            def run_prefill(mtp=False):
                cache = init_cache(config, 1, max_len, dt, mtp=mtp)
                return prefill(params, cache, prompt, lengths, chunk, config, dt, mtp)

            compiled = extend._cache_size()
            (logits, _, cache), first_s = timed(run_prefill)
            first_compiles = extend._cache_size() - compiled
            before = in_use()
            del cache
            (logits, _, cache), prefill_s = timed(run_prefill)
            cache_mem = in_use() - before
            emit(dict(base, what="prefill", batch=1, time_s=prefill_s, tokens_per_s=context / prefill_s,
                      first_prefill_s=first_s, first_prefill_compiles=first_compiles, cache_bytes_measured=cache_mem,
                      cache_bytes_formula=cache_bytes(config, max_len, 1, dt)["total"]))
            def distinct_starts(b):
                """Logits [b, V] whose greedy token is a different one in each row."""
                first = rng.choice(np.arange(3, config.vocab_size), b, replace=False)
                return jnp.full((b, config.vocab_size), -1e9, jnp.float32).at[np.arange(b), first].set(0.0)

            touched = {}  # batch size -> the measured share of experts a step reads
            variants = []  # (row label, module, its flag turned off for the row, smallest batch only)
            if args.mhc_xla:
                variants.append(("mHC in XLA", mhc, "USE_KERNEL", False))
            if args.grouped_decode:
                variants.append(("grouped experts", moe, "GATHER_FEW_PAIRS", True))
            for b in sorted(int(x) for x in args.batches.split(",")):
                cb = jax.tree.map(lambda a, b=b: jnp.repeat(a, b, axis=0), cache)
                lb = distinct_starts(b)
                sp = sampling_params(b, temperature=0.0)
                active = jnp.ones((b,), bool)

                def loop(cb, lb, n, chunk_len):
                    return decode_tokens(params, cb, lb, sp, jnp.int32(0), active, jnp.int32(n), no_stops, config,
                                         dt, chunk_len, all_greedy=True)  # greedy rows, as generate() runs them

                def time_loop(cb, lb, what):
                    """--steps tokens in one call, timed after a compiling call; its row emitted. -> (cb, lb)"""
                    (out0, _, _, lb, cb, _), compile_s = timed(lambda: loop(cb, lb, args.steps, args.steps))
                    (out1, _, n, lb, cb, _), loop_s = timed(lambda: loop(cb, lb, args.steps, args.steps))
                    step = loop_s / int(n)
                    if b not in touched:  # the rows' whole token histories, routed again
                        seqs = np.concatenate([np.repeat(np.asarray(prompt), b, 0), np.asarray(out0), np.asarray(out1)],
                                              axis=1)
                        touched[b] = experts_touched(params, config, dt, seqs, int(n))
                    emit(dict(base, what=what, batch=b, step_s=step, tokens_per_s=b / step, compile_s=compile_s,
                              cache_bytes_formula=cache_bytes(config, max_len, b, dt)["total"],
                              **floor(params, cb, b, step, touched[b]),
                              peak_gib=(dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30))
                    return cb, lb

                def trace_loop(cb, lb, what):
                    """--steps tokens in one call, traced; its row emitted (cb is donated)."""
                    prof = profile_ops(lambda: jax.block_until_ready(loop(cb, lb, args.steps, args.steps)),
                                       dev.platform, args.steps)
                    emit(dict(base, what=what, batch=b, **prof))

                cb, lb = time_loop(cb, lb, "decode, device loop")
                if args.host_loop:
                    _, _, _, lb, cb, _ = loop(cb, lb, 1, 1)  # compile the one-step program
                    times = []
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        out, _, _, lb, cb, _ = loop(cb, lb, 1, 1)
                        np.asarray(out)  # the host reads each step's tokens
                        times.append(time.perf_counter() - t0)
                    step = float(np.median(times))
                    emit(dict(base, what="decode, host loop", batch=b, step_s=step, tokens_per_s=b / step,
                              **floor(params, cb, b, step, touched[b])))
                if args.profile:
                    trace_loop(cb, lb, "decode profile")
                for label, module, flag, only_smallest in variants:
                    if only_smallest and b != min(int(x) for x in args.batches.split(",")):
                        continue
                    setattr(module, flag, False)
                    jax.clear_caches()  # the flag is read when tracing
                    try:
                        cb = jax.tree.map(lambda a, b=b: jnp.repeat(a, b, axis=0), cache)  # the last cb was donated
                        cb, lb = time_loop(cb, distinct_starts(b), f"decode, device loop, {label}")
                        if args.profile:
                            trace_loop(cb, lb, f"decode profile, {label}")
                    finally:  # a failure here must not leave the rows after it on this path
                        setattr(module, flag, True)
                        jax.clear_caches()
                del cb, lb
            del cache
            if args.speculative:
                run_mtp = lambda: run_prefill(mtp=True)  # noqa: E731
                (logits, x_last, cache), _ = timed(run_mtp)
                for b in sorted(int(x) for x in args.batches.split(",")):
                    cb = jax.tree.map(lambda a, b=b: jnp.repeat(a, b, axis=0), cache)
                    sp = sampling_params(b, temperature=0.0)
                    lb, xb = distinct_starts(b), jnp.repeat(x_last, b, axis=0)
                    rounds = args.steps // 2

                    def spec(cb):
                        _, state = start_speculation(lb, xb, sp, no_stops, jnp.int32(10**9))
                        return speculate_tokens(params, cb, state, sp, jnp.int32(10**9), no_stops, config, dt, rounds,
                                                all_greedy=True)

                    (_, _, cb, _), compile_s = timed(lambda: spec(cb))
                    (_, n, cb, state), loop_s = timed(lambda: spec(cb))
                    step = loop_s / rounds
                    rate = int(state["accepted"]) / max(int(state["drafted"]), 1)
                    plain = next(r["step_s"] for r in rows if r.get("what") == "decode, device loop"
                                 and r["batch"] == b and r["context"] == context and r["weights"] == weights)
                    emit(dict(base, what="decode, speculative mtp", batch=b, step_s=step,
                              tokens_per_s=float(np.sum(np.asarray(n))) / loop_s, acceptance_rate=rate,
                              break_even_acceptance=step / plain - 1, compile_s=compile_s,
                              **floor(params, cb, b, step, touched[b], speculative=True)))
                    del cb
                del cache
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001  (an out-of-memory run is a result)
            emit(dict(base, error=repr(e)[:400]))
        params = None  # (the kept copy freed before the next)
        if args.peer_only and context <= args.peer_max_context and weights == "bf16":
            try:
                emit(dict(base, what="peer transformers", batch=1, **hf_peer(config, context, args.steps)))
            except Exception as e:  # noqa: BLE001
                emit(dict(base, what="peer transformers", error=repr(e)[:400]))

    print(f"\n{args.config} on {dev.device_kind}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>8} {r.get('what', ''):>24}  failed: {r['error'][:100]}")
        elif "tokens_per_s" in r:
            extra = f", {r['floor_fraction']:.1%} of the floor" if "floor_fraction" in r else ""
            extra += f", first prefill {r['first_prefill_s']:.2f} s" if "first_prefill_s" in r else ""
            extra += f", acceptance {r['acceptance_rate']:.2f}" if "acceptance_rate" in r else ""
            extra += f", {r['experts_touched']:.0%} of the experts read" if "experts_touched" in r else ""
            print(f"{r['context']:>8} {r['what']:>24} {r['weights']:>5} batch {r['batch']:>3}: "
                  f"{r['tokens_per_s']:>10.0f} tok/s{extra}")
        elif "top_ops" in r:
            print(f"{r['context']:>8} {r['what']:>24} batch {r['batch']:>3}: device busy "
                  f"{r['device_busy_us_per_token']:.0f} us/token, {r['launches_per_token']:.0f} launches/token")
        else:
            print(f"{r['context']:>8} {r['what']:>24} batch 1: prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
                  f"decode {r['decode_tokens_per_s']:.1f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
