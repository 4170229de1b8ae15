"""Can tokamax's weight-quantised grouped matmul take kept FP4 experts? (issue 35, GPU probe)

    python bench/quant_experts_probe.py --json out.json

The routed experts of bench-flash-8l (64 experts, d 2048, f 512) as the release stores them (FP4
codes, one E8M0 scale per 32 inputs; ``v4jax.quant.block_scaled``), multiplied by the rows of a
decode step (6 pairs at batch 1, 192 at batch 32, spread over the experts as a router would):

* ``bf16 weights``: tokamax's grouped matmul on bf16 weights (what a bf16 model decodes with);
* ``decode, then bf16``: the kept codes decoded to bf16 in the step, then the same grouped matmul
  (what v4jax does with kept weights today);
* ``qarray <dtype>``: tokamax's grouped matmul with the weight as a qwix ``QArray`` (codes
  [g, K, N] in <dtype>, bf16 scales [g, K/32, N]), decoded inside its kernel. float4_e2m1fn is
  the release's byte layout; float8_e4m3fn and int8 (codes x 2) hold the same values exactly.

Each row: the time per product (median of 50 in one jitted loop) and the error against the
float32 product of the decoded weights. A variant the kernel refuses prints its error instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    import qwix
    import tokamax

    from v4jax.quant import block_scaled

    sys.path.insert(0, os.path.dirname(__file__))
    from timing import json_rows

    _, emit = json_rows(args.json)

    rng = np.random.default_rng(0)
    g = 64
    for name, k, n in (("w1 (d -> f)", 2048, 512), ("w2 (f -> d)", 512, 2048)):
        w = jnp.asarray(rng.normal(size=(g, n, k)) * 0.02, jnp.float32)  # stored [out, in]
        kept = block_scaled(w, "fp4")
        w_dec = kept.values(jnp.float32)  # [g, n, k], the exact decoded values
        w_kn = jnp.swapaxes(w_dec, 1, 2)  # [g, k, n]
        codes = w_kn / jnp.repeat(jnp.swapaxes(kept.scales.astype(jnp.float32), 1, 2), 32, axis=1)
        scale = jnp.swapaxes(kept.scales.astype(jnp.float32), 1, 2).astype(jnp.bfloat16)  # [g, k/32, n]
        for m in (6, 192):
            sizes = np.bincount(rng.integers(0, g, m), minlength=g).astype(np.int32)
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            sizes = jnp.asarray(sizes)
            want = np.asarray(jax.lax.ragged_dot(x.astype(jnp.float32), w_kn, sizes,
                                                 precision=jax.lax.Precision.HIGHEST))

            def timed(label, fn, *operands):
                base = dict(product=name, rows=m, variant=label)
                try:
                    loop = jax.jit(lambda *ops: jax.lax.fori_loop(
                        0, args.reps, lambda i, acc: acc + fn(*ops).astype(jnp.float32), jnp.zeros((m, n))))
                    got = np.asarray(jax.jit(fn)(*operands)).astype(np.float32)
                    jax.block_until_ready(loop(*operands))
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        jax.block_until_ready(loop(*operands))
                        times.append((time.perf_counter() - t0) / args.reps)
                    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    emit(dict(base, us=1e6 * float(np.median(times)), rel_err=err))
                except Exception as e:  # noqa: BLE001  (a refused variant is a result)
                    emit(dict(base, error=repr(e)[:600]))

            mosaic = dict(implementation="mosaic")
            timed("bf16 weights", lambda x, w: tokamax.ragged_dot(x, w, sizes, **mosaic), x, w_kn.astype(jnp.bfloat16))
            timed("decode, then bf16",
                  lambda x, kept: tokamax.ragged_dot(x, jnp.swapaxes(kept.values(jnp.bfloat16), 1, 2), sizes, **mosaic),
                  x, kept)
            for dtype, mult in ((jnp.float4_e2m1fn, 1), (jnp.float8_e4m3fn, 1), (jnp.int8, 2)):
                q = qwix.QArray(qvalue=(codes * mult).astype(dtype), scale=(scale.astype(jnp.float32) / mult)
                                .astype(jnp.bfloat16))
                timed(f"qarray {jnp.dtype(dtype).name}", lambda x, q: tokamax.ragged_dot(x, q, sizes, **mosaic), x, q)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, tokamax {tokamax.__version__}")


if __name__ == "__main__":
    main()
