"""Checkpoint conversion: safetensors (the release's FP8/FP4 layout or the transformers one) <-> Orbax.

Command line: ``python -m v4jax.convert --help`` (or ``v4jax-convert``). Python::

    from v4jax.convert import to_orbax, to_safetensors, load_checkpoint
"""


def __getattr__(name):  # lazy, so that `python -m v4jax.convert --help` starts fast
    if name == "to_orbax":
        from v4jax.convert.safetensors_to_orbax import to_orbax

        return to_orbax
    if name == "to_safetensors":
        from v4jax.convert.orbax_to_safetensors import to_safetensors

        return to_safetensors
    if name == "load_checkpoint":
        from v4jax.convert.load import load_checkpoint

        return load_checkpoint
    raise AttributeError(name)


__all__ = ["to_orbax", "to_safetensors", "load_checkpoint"]
