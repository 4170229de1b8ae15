"""Read a safetensors checkpoint (the release's layout or the one ``transformers`` writes) into our tree.

Every tensor is checked against the config before anything is returned: missing, unexpected and
wrongly shaped or typed tensors are reported together, by name.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.convert.names import detect_layout, from_official, is_routed_expert, official_name, to_official, tree_paths
from v4jax.convert.safetensors_io import Checkpoint, CheckpointError

_FLOAT_KINDS = {"F32", "BF16", "F16", "F64"}


def expected_names(specs) -> dict[str, tuple[tuple, int | None]]:
    """official name -> (tree path, expert index or None) for every tensor the config implies."""
    out = {}
    for path, spec in tree_paths(specs):
        if is_routed_expert(path):
            for e in range(spec.shape[0]):
                out[official_name(path, e)] = (path, e)
        else:
            out[official_name(path)] = (path, None)
    return out


def load_checkpoint(directory: str | Path, config: ModelConfig, dtype=jnp.float32, progress: bool = False):
    """Read all tensors of ``directory`` into a parameter tree of numpy arrays.

    Returns (params, layout). fp32-kept tensors stay fp32, others are cast to ``dtype``. A checkpoint
    without ``mtp.*`` tensors (as ``transformers`` saves it) loads without the MTP block, with a warning.
    """
    from v4jax.model import param_specs  # noqa: PLC0415 (model imports nothing from here)

    ckpt = Checkpoint(directory)
    try:
        layout = detect_layout(ckpt.keys())
        present = {to_official(k, layout): k for k in ckpt.keys()}
        specs = param_specs(config, dtype)
        if config.num_nextn_predict_layers and not any(n.startswith("mtp.") for n in present):
            warnings.warn(f"{directory} has no mtp.* tensors (the transformers layout drops them): "
                          "the model loads without its MTP block", stacklevel=2)
            specs.pop("mtp")
        expected = expected_names(specs)
        problems = _check(ckpt, present, expected, specs, layout)
        if problems:
            raise CheckpointError(f"{directory} does not match its config.json:\n  " + "\n  ".join(problems))

        flat: dict[tuple, np.ndarray] = {}
        items = list(expected.items())
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            items = tqdm(items, desc="loading tensors", unit="tensor")
        for name, (path, expert) in items:
            spec = _spec_at(specs, path)
            value = ckpt.get(present[name])
            value = value.astype(np.int32) if spec.dtype == jnp.int32 else value.astype(spec.dtype)
            if expert is None:
                flat[path] = value
            else:
                flat.setdefault(path, np.empty(spec.shape, spec.dtype))[expert] = value
        return _unflatten(specs, flat), layout
    finally:
        ckpt.close()


def _check(ckpt: Checkpoint, present: dict, expected: dict, specs, layout: str) -> list[str]:
    problems = []
    missing = [n for n in expected if n not in present]
    if missing:
        problems.append(f"missing {len(missing)} tensors: " + ", ".join(from_official(n, layout) for n in missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    unexpected = [present[n] for n in present if n not in expected and not n.endswith(".scale")]
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: " + ", ".join(sorted(unexpected)[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    for name, (path, expert) in expected.items():
        if name not in present:
            continue
        key = present[name]
        spec_shape = _spec_at(specs, path).shape[1 if expert is not None else 0:]
        kind = ckpt.where[key].dtype_name(key)
        if "tid2eid" in name:
            if kind not in ("I64", "I32"):
                problems.append(f"{key}: dtype {kind}, expected I64 or I32")
        elif kind not in _FLOAT_KINDS:
            problems.append(f"{key}: dtype {kind} is quantised or not a float; dequantising FP8/FP4 "
                            "checkpoints is not supported yet")
        if ckpt.shape(key) != spec_shape:
            problems.append(f"{key}: shape {list(ckpt.shape(key))}, the config implies {list(spec_shape)}")
    return problems


def _spec_at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _unflatten(specs, flat):
    def build(tree, prefix):
        if isinstance(tree, dict):
            return {k: build(v, prefix + (k,)) for k, v in tree.items()}
        if isinstance(tree, list):
            return [build(v, prefix + (i,)) for i, v in enumerate(tree)]
        return flat[prefix]

    return build(specs, ())
