"""Test setup: 8 fake CPU devices for sharding tests, fp32 matmuls, a persistent compile cache, and
compiled programs released before a worker runs out of memory mappings."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_CACHE_DIR", os.path.expanduser("~/.cache/v4jax-jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

MAX_MAPPINGS = 20_000  # a third of Linux's default vm.max_map_count (65,530)


def _mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture(autouse=True)
def release_compiled_programs():
    """After a test, drop JAX's compiled programs once the process holds MAX_MAPPINGS memory mappings.

    Every XLA:CPU executable keeps memory mappings of its JIT code, and JAX's caches keep every
    executable. A pytest-xdist worker running a good part of the suite reached the kernel's limit
    (the core of a crashed worker had 65,351 mappings): the next compile could not map its code,
    and the C++ exception carrying that error segfaulted in the unwinder. Clearing costs
    recompiles (the persistent cache serves some), so it only happens past the threshold.
    """
    yield
    if os.path.exists("/proc/self/maps") and _mappings() > MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()
