"""mHC's collapse for a decode step on the GPU: ``v4jax.mhc_kernel`` against ``hc_pre`` + RMSNorm in XLA.

    python bench/mhc_kernel.py [--d 2048 --n 4 --tokens 1,32]

For each token count, random bf16 streams and fp32 mix parameters: the largest difference of the
kernels' outputs from XLA's (relative to the largest value), then each path's time per call (the
median of 20 timings of 50 calls; a decode step makes 2 calls a layer). Outside a decode loop one
call is bound by its dispatch: the decode benchmark's trace (bench/decode.py --profile) gives the
kernels' own times. Exits 1 if an output differs by more than 1e-2 (bf16's rounding of the sublayer
input) or the kernels fail.
"""

from __future__ import annotations

import argparse
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", default="1,32")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from v4jax import mhc, mhc_kernel

    n, d = args.n, args.d
    q = (2 + n) * n
    rng = np.random.default_rng(0)
    p = {"fn": jnp.asarray(rng.normal(size=(q, n * d)) * 0.02, jnp.float32),
         "base": jnp.asarray(rng.normal(size=(q,)), jnp.float32),
         "scale": jnp.asarray([0.5, 0.7, 1.3], jnp.float32)}
    w = jnp.asarray(1 + 0.1 * rng.normal(size=(d,)), jnp.bfloat16)
    kw = dict(sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    xla = jax.jit(lambda x: mhc.hc_pre_normed(x, p, w, **kw))
    fused = jax.jit(lambda x: mhc_kernel.collapse_normed(x, p, w, **kw))
    ok = True
    for t in (int(v) for v in args.tokens.split(",")):
        x = jnp.asarray(rng.normal(size=(t, 1, n, d)), jnp.bfloat16)
        want, got = jax.device_get(xla(x)), jax.device_get(fused(x))
        errs = [float(np.abs(np.float32(a) - np.float32(g)).max() / np.abs(np.float32(a)).max())
                for a, g in zip(want, got)]
        ok &= max(errs) < 1e-2
        times = {}
        for name, fn in (("xla", xla), ("kernels", fused)):
            runs = []
            for _ in range(20):
                t0 = time.perf_counter()
                for _ in range(50):
                    out = fn(x)
                jax.block_until_ready(out)
                runs.append((time.perf_counter() - t0) / 50)
            times[name] = float(np.median(runs)) * 1e6
        print(f"tokens {t:3d}: relative difference h {errs[0]:.1e}, post {errs[1]:.1e}, comb {errs[2]:.1e}; "
              f"us a call: XLA {times['xla']:.1f}, kernels {times['kernels']:.1f}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
