"""Read a safetensors checkpoint (the release's layout or the one ``transformers`` writes) into our tree.

Every tensor is checked against the config before anything is read (``source.plan_checkpoint``):
missing, unexpected, wrongly shaped and wrongly typed tensors are reported together, by name.
FP8 (128×128 block scales) and packed FP4 (32-wide group scales) weights are dequantised exactly;
E8M0 or F32 scales are accepted; ``tid2eid`` (I64) becomes int32.

Memory: the result is the whole model (it is returned); beyond it, one block of rows (``block_mb``)
is held at a time, so loading needs about the model's size plus a fixed margin.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig
from v4jax.convert.names import unflatten
from v4jax.convert.safetensors_io import Checkpoint, CheckpointError  # noqa: F401 (re-exported)
from v4jax.convert.source import blocks, plan_checkpoint, rows_per_block
from v4jax.quant import BlockScaled


def load_checkpoint(directory: str | Path, config: ModelConfig, dtype=jnp.float32, progress: bool = False,
                    block_mb: int = 64, quantized: bool = False):
    """Read all tensors of ``directory`` into a parameter tree of numpy arrays.

    Returns (params, layout). fp32-kept tensors stay fp32, others are cast to ``dtype``. A checkpoint
    without ``mtp.*`` tensors (as ``transformers`` saves it) loads without the MTP block, with a warning.
    ``quantized``: the weights stored in FP8 or FP4 stay so, as ``v4jax.quant.BlockScaled`` (their
    codes and E8M0 scales as the files hold them; an expert leaf stacks its experts').
    """
    ckpt = Checkpoint(directory)
    try:
        plan = plan_checkpoint(ckpt, config, dtype, directory=directory)
        bar = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            total = sum(s.source_nbytes if quantized and s.stored_format else s.nbytes for s in plan.sources)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading")
        flat = {}
        for src in plan.sources:
            if quantized and src.stored_format:
                flat[src.path] = _read_stored(src, bar)
                continue
            out = np.empty(src.shape, src.dtype)
            for lead, r0, r1 in blocks(src.shape, rows_per_block(src.shape, src.dtype.itemsize, block_mb << 20)):
                block = src.read(lead, r0, r1)
                if out.ndim == 1:
                    out[...] = block
                else:
                    out[lead + (slice(r0, r1),)] = block
                if bar is not None:
                    bar.update(block.nbytes)
            src.release()
            flat[src.path] = out
        if bar is not None:
            bar.close()
        return unflatten(plan.specs, flat), plan.layout
    finally:
        ckpt.close()


def _read_stored(src, bar) -> BlockScaled:
    parts = []
    for part in ("codes", "scales"):
        shape = src.stored_spec(part).shape
        out = None
        for lead in np.ndindex(*shape[:-2]):  # each expert of an expert leaf (its own tensor)
            block = src.read_stored(part, lead, 0, shape[-2])
            if out is None:
                out = np.empty(shape, block.dtype)
            out[lead] = block
            if bar is not None:
                bar.update(block.nbytes)
        parts.append(out)
    return BlockScaled(*parts, src.stored_format)
