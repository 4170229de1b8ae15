"""Timing of one jitted function, shared by the kernel benchmarks (bench/attention_kernel.py,
bench/moe_kernels.py)."""

from __future__ import annotations

import time

import jax
import numpy as np


def timed(fn, args, reps: int, warmup: int = 2):
    """Compile ``fn`` (a jitted function) for ``args``, run it ``warmup`` times, then time ``reps``
    runs, each closed by ``block_until_ready``. Returns (output, median ms, compile s)."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return out, float(np.median(times)) * 1e3, compile_s
