"""Timing of one jitted function, shared by the kernel benchmarks (bench/attention_kernel.py,
bench/moe_kernels.py), and the result rows the decode benchmarks print and save (``json_rows``)."""

from __future__ import annotations

import json
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


def json_rows(path: str | None):
    """(rows, emit): ``emit(row)`` appends a result row to ``rows``, prints it as a JSON line and, when
    ``path`` is given, rewrites that file with every row so far: a run cut short keeps what it
    measured."""
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if path:
            with open(path, "w") as f:
                json.dump(rows, f, indent=2)

    return rows, emit
