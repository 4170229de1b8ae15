"""Test setup: 8 fake CPU devices for sharding tests, fp32 matmuls, a persistent compile cache."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_CACHE_DIR", os.path.expanduser("~/.cache/v4jax-jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
