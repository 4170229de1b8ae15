"""Command lines: ``v4jax-train`` (``train.py``), ``v4jax-eval`` (``eval.py``), ``v4jax-convert``."""
