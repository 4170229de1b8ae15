"""Why an 8K prefill of bench-flash-8l is slow (issue 36 item 4): one prompt of --context random
tokens prefilled twice per variant (first: with compiling; second: steady), for the MoE's grouped
matmul by tokamax or by XLA (jax.lax.ragged_dot) and for cache capacities; the first variant's
steady prefill is traced and its costliest device ops printed.

    python bench/prefill_probe.py --config configs/bench-flash-8l.yaml --context 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/bench-flash-8l.yaml")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--variants", default="tokamax:8448,ragged_dot:8448,tokamax:16384")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from profile_step import time_by_op, traced
    from timing import json_rows

    from v4jax import moe
    from v4jax.config import model_config_from_yaml
    from v4jax.decode import extend, init_cache
    from v4jax.generate import prefill
    from v4jax.model import init_params

    config = model_config_from_yaml(args.config)
    params = init_params(config, 0, jnp.bfloat16)
    prompt = [list(np.random.default_rng(0).integers(3, config.vocab_size, args.context))]
    _, emit = json_rows(args.json)
    real_installed = moe.tokamax_installed
    for i, variant in enumerate(args.variants.split(",")):
        backend, capacity = variant.split(":")
        moe.tokamax_installed = real_installed if backend == "tokamax" else (lambda: False)
        extend.clear_cache()

        def run():
            cache = init_cache(config, 1, int(capacity), jnp.bfloat16)
            t0 = time.perf_counter()
            out = prefill(params, cache, prompt, np.array([args.context]), 8192, config, jnp.bfloat16, False)
            jax.block_until_ready(out)
            return time.perf_counter() - t0

        first = run()
        row = {"backend": backend, "capacity": int(capacity), "first_s": first}
        if i == 0:
            row["steady_s"], path = traced(run)
            t, n = time_by_op(path, "gpu")
            row["device_busy_s"] = sum(t.values()) / 1e9
            row["top_ops"] = [(k, v / 1e9, n[k]) for k, v in t.most_common(12)]
        else:
            row["steady_s"] = run()
        row["second_compiles"] = extend._cache_size()
        emit(row)


if __name__ == "__main__":
    sys.exit(main())
