"""Inference on one device: prefill and decode speed, and the cache's memory, against the context.

    python bench/decode.py --config configs/small.yaml --contexts 8192,131072 --batches 1,32 --steps 32
    python bench/decode.py ... --peer-only      # transformers' generate, batch 1, same shapes (own process)
    python bench/decode.py ... --weights bf16,kept   # also with the weights kept FP8/FP4 (schema.as_stored)

For each context C: an empty cache for C + steps tokens (``v4jax.decode.init_cache``), the prompt of
C random tokens prefilled through ``extend`` in chunks of ``--prefill-chunk`` (one compiled
program; timed after a warm-up on a throwaway cache), then for each batch size the cache tiled to
that many rows and ``--steps`` decode steps (``v4jax.generate.decode_step``: sample, then extend
by one token), each step synchronised as generation reads every token on the host. bf16 parameters
and cache, random weights drawn on the device. The cache's device memory is read from the
allocator (bytes in use after allocating it, minus before) next to ``cache_bytes``.

``--peer-only``: ``transformers``' DeepSeek-V4 (PyTorch eager, bf16, its dynamic cache) on the same
config, batch 1: prefill time (generate with one new token) and decode tokens/s ((generate with
steps + 1 new tokens - prefill) / steps). transformers cannot batch rows of different lengths for
this model (no left padding), so only batch 1, and only up to ``--peer-max-context``. Prints JSON lines and a table; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--contexts", default="8192,131072")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--peer-only", action="store_true",
                    help="run only the peer (in its own process: JAX's preallocated pool leaves it no memory)")
    ap.add_argument("--peer-max-context", type=int, default=8192,
                    help="run the peer only up to this context (its attention is dense: O(context^2))")
    ap.add_argument("--weights", default="bf16",
                    help="bf16 and/or kept: the release's FP8 matrices and FP4 experts held as stored "
                    "(v4jax.schema.as_stored of the same random weights), decoded in each matmul")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from v4jax.config import model_config_from_yaml
    from v4jax.decode import cache_bytes, extend, init_cache
    from v4jax.generate import decode_step
    from v4jax.model import init_params
    from v4jax.sampling import sampling_params

    config = model_config_from_yaml(args.config)
    dev = jax.devices()[0]
    dt = jnp.bfloat16
    dense = None if args.peer_only else init_params(config, 0, dt)
    in_use = lambda: (dev.memory_stats() or {}).get("bytes_in_use", 0)  # noqa: E731
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)

    chunk = args.prefill_chunk
    rng = np.random.default_rng(0)
    for context, weights in ((c, w) for c in sorted(int(c) for c in args.contexts.split(","))
                             for w in args.weights.split(",")):
        max_len = context + args.steps + 128
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
            prompt = rng.integers(3, config.vocab_size, (1, context)).astype(np.int32)
            t0 = time.perf_counter()
            warm = init_cache(config, 1, max_len, dt)
            _, warm = extend(params, warm, jnp.asarray(prompt[:, :chunk]), jnp.array([chunk], jnp.int32), config, dt)
            jax.block_until_ready(warm)
            compile_s = time.perf_counter() - t0
            del warm
            before = in_use()
            cache = init_cache(config, 1, max_len, dt)
            jax.block_until_ready(cache)
            cache_mem = in_use() - before
            t0 = time.perf_counter()
            for s in range(0, context, chunk):
                n = min(chunk, context - s)
                tokens = np.zeros((1, chunk), np.int32)
                tokens[:, :n] = prompt[:, s:s + n]
                logits, cache = extend(params, cache, jnp.asarray(tokens), jnp.array([n], jnp.int32), config, dt)
            jax.block_until_ready(logits)
            prefill_s = time.perf_counter() - t0
            emit(dict(base, what="prefill", batch=1, time_s=prefill_s, tokens_per_s=context / prefill_s,
                      compile_s=compile_s, cache_bytes_measured=cache_mem,
                      cache_bytes_formula=cache_bytes(config, max_len, 1, dt)["total"]))
            for b in sorted(int(x) for x in args.batches.split(",")):
                cb = jax.tree.map(lambda a, b=b: jnp.repeat(a, b, axis=0), cache)
                lb = jnp.repeat(logits, b, axis=0)
                sp = sampling_params(b, temperature=0.0)
                active = jnp.ones((b,), bool)
                t0 = time.perf_counter()
                tok, lb, cb = decode_step(params, cb, lb, sp, jnp.int32(0), active, config, dt)
                np.asarray(tok)
                compile_s = time.perf_counter() - t0
                times = []
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    tok, lb, cb = decode_step(params, cb, lb, sp, jnp.int32(i + 1), active, config, dt)
                    np.asarray(tok)  # generation reads each step's tokens on the host
                    times.append(time.perf_counter() - t0)
                step = float(np.median(times))
                emit(dict(base, what="decode", batch=b, step_s=step, tokens_per_s=b / step, compile_s=compile_s,
                          cache_bytes_formula=cache_bytes(config, max_len, b, dt)["total"],
                          peak_gib=(dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30))
                del cb, lb
            del cache
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001  (an out-of-memory run is a result)
            emit(dict(base, error=repr(e)[:400]))
        del params
        if args.peer_only and context <= args.peer_max_context and weights == "bf16":
            try:
                emit(dict(base, what="peer transformers", batch=1, **hf_peer(config, context, args.steps)))
            except Exception as e:  # noqa: BLE001
                emit(dict(base, what="peer transformers", error=repr(e)[:400]))

    print(f"\n{args.config} on {dev.device_kind}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>8} {r.get('what', ''):>18}  failed: {r['error'][:100]}")
        else:
            print(f"{r['context']:>8} {r['what']:>18} {r['weights']:>5} batch {r['batch']:>3}: "
                  f"{r['tokens_per_s']:>10.0f} tok/s"
                  if "tokens_per_s" in r else
                  f"{r['context']:>8} {r['what']:>18} batch 1: prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
                  f"decode {r['decode_tokens_per_s']:.1f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
