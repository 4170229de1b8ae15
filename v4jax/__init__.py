"""v4jax: DeepSeek-V4 in JAX.

``Model``, ``ModelConfig``, ``from_pretrained`` and ``from_run`` are imported on first use, so that
the command lines (``v4jax-train --help`` and the like) start without loading jax.
"""

__all__ = ["Model", "ModelConfig", "from_pretrained", "from_run"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Model", "from_pretrained", "from_run"):
        from v4jax import api

        return getattr(api, name)
    if name == "ModelConfig":
        from v4jax.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'v4jax' has no attribute {name!r}")
