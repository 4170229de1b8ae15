"""v4jax: DeepSeek-V4 in JAX."""

from v4jax.api import Model, from_pretrained, from_run
from v4jax.config import ModelConfig

__all__ = ["Model", "ModelConfig", "from_pretrained", "from_run"]
__version__ = "0.1.0"
