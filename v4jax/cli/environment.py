"""What a command runs on, in the one line ``v4jax-train``, ``v4jax-eval`` and ``v4jax-generate`` print
first: jax, the backend, the devices and the kernel path of each op."""

from __future__ import annotations

import jax

from v4jax import attention_kernel, devices, mhc, moe


def describe(parallel=None) -> str:
    """One line for the start of a run: jax, the backend, the devices, and the path each op with a
    kernel takes here under ``parallel`` (a ``v4jax.parallel.ParallelConfig``; None: the defaults).
    The Sinkhorn path is the one for V4's 4 streams."""
    acc = devices.current()
    chips = f"{jax.device_count()} x {acc.kind}" + (f" ({acc.sm})" if acc.sm else "")
    if jax.process_count() > 1:
        chips += f" over {jax.process_count()} processes"
    backend = moe.resolve_backend(parallel.moe_backend if parallel else "auto", acc)
    if backend == "tokamax":
        backend += " (forward {}, input gradient {}, weight gradient {})".format(*moe.tokamax_kernels(acc))
    attention = parallel.attention_kernel if parallel else "xla"
    if attention == "pallas" and not attention_kernel.runs_on(acc):
        attention = "xla (the pallas kernel needs an NVIDIA GPU of compute capability >= 8.0)"
    elif attention == "pallas" and acc.platform == "cpu":
        attention = "pallas (interpreted)"
    return (f"jax {jax.__version__}, backend {acc.platform}: {chips}; MoE grouped matmul: {backend}; "
            f"mHC Sinkhorn: {'pallas' if mhc.sinkhorn_kernel_runs(4, acc) else 'xla'}; attention: {attention}")
