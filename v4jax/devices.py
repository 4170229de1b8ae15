"""The accelerator v4jax runs on, and which of its kernels that accelerator can run.

The fast paths are measured on Hopper GPUs (H100, H200). Each other device takes, op by op, the
fastest path it can run, and XLA's reference path where it can run none:

    path                                     runs on
    our Pallas Triton kernels (mHC Sinkhorn,  NVIDIA GPUs of compute capability >= 8.0: XLA's
    MoE weight gradient, opt-in attention)    Triton pipeline refuses older ones (a T4 is 7.5)
    tokamax's Mosaic GPU grouped matmul       compute capability 9.x and 10.x: tokamax 0.0.17 has
    (MoE forward and input gradient)          Hopper and datacenter Blackwell kernels for our
                                              products; its Ampere (8.x) kernel is marked
                                              experimental; it raises on every other GPU

AMD GPUs report no CUDA compute capability and take XLA's paths. ``current`` is the one place that
reads the device; tests replace it to stand in for GPUs that are not here.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Accelerator:
    platform: str  # jax.default_backend(): cpu, gpu or tpu
    kind: str  # the first device's device_kind, e.g. "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int] | None = None  # NVIDIA compute capability; None elsewhere

    @property
    def sm(self) -> str:
        """The capability as "sm90" (for 9.0), or "" where there is none."""
        return f"sm{self.capability[0]}{self.capability[1]}" if self.capability else ""


def current() -> Accelerator:
    """The default backend and its first device (all devices of a jax program are of one kind)."""
    device = jax.devices()[0]
    return Accelerator(jax.default_backend(), device.device_kind,
                       parse_capability(getattr(device, "compute_capability", None)))


def parse_capability(value) -> tuple[int, int] | None:
    """A device's ``compute_capability`` ("8.9" on NVIDIA GPUs) as (8, 9); None for anything else
    (absent, or an AMD architecture name)."""
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def pallas_triton(acc: Accelerator) -> bool:
    """Whether Pallas kernels compile for Triton here: an NVIDIA GPU of compute capability >= 8.0."""
    return acc.platform == "gpu" and acc.capability is not None and acc.capability >= (8, 0)


def tokamax_mosaic(acc: Accelerator) -> bool:
    """Whether tokamax's Mosaic GPU grouped matmul has kernels for our products here: Hopper (sm90),
    datacenter Blackwell (sm100, sm103)."""
    return acc.platform == "gpu" and acc.capability is not None and acc.capability[0] in (9, 10)


# Shared memory one thread block may use, KB, by compute capability (CUDA programming guide).
# Unlisted GPUs are assumed to have the least of those Triton runs on (sm86, sm89, sm120: 99 KB).
SHARED_MEMORY_KB = {(8, 0): 163, (8, 7): 163, (9, 0): 227, (10, 0): 227, (10, 3): 227}


def shared_memory_kb(acc: Accelerator) -> int:
    return SHARED_MEMORY_KB.get(acc.capability, 99)
