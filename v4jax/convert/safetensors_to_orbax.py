"""safetensors (the release's layout or the transformers one, FP8/FP4 or plain) -> v4jax Orbax.

``to_orbax(src, dst, dtype)`` detects the layout, checks every tensor against config.json (all
problems reported together, nothing written), then streams each leaf of the parameter tree into an
Orbax checkpoint block by block (see ``orbax_io``), dequantising on the way (or, with
``keep_quantized``, copying FP8/FP4 weights as stored). The output directory appears under its name
only when complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from v4jax.config import ConfigError, ModelConfig
from v4jax.convert.checks import check_mesh, check_separate, positive_int, positive_mb
from v4jax.convert.names import HF_STYLE, RELEASE_STYLE, config_style
from v4jax.convert.orbax_io import (
    PARAMS,
    atomic_output_dir,
    check_output_dir,
    save_streaming,
    stream_leaves,
    write_marker,
)
from v4jax.convert.safetensors_io import Checkpoint
from v4jax.convert.source import plan_checkpoint
from v4jax.workdir import find_run

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def read_config(src: Path) -> tuple[ModelConfig, str]:
    """config.json of ``src`` -> (ModelConfig, style: "release" or "hf")."""
    path = Path(src) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {src}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return ModelConfig.from_dict(dict(raw)), config_style(raw)


def config_dict(config: ModelConfig, style: str) -> dict:
    return config.to_release_dict() if style == RELEASE_STYLE else config.to_hf_dict()


class Progress:
    """tqdm bar over bytes written, with tensors done (a routed expert counts as one tensor)."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool = True):
        self.total_tensors, self.tensors = total_tensors, 0
        self._left: dict = {}
        self.bar = None
        if enabled:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True)
            self.bar.set_postfix_str(f"0/{total_tensors} tensors")

    def expect(self, key, n_blocks: int):
        self._left[key] = n_blocks

    def block(self, key, nbytes: int):
        self._left[key] -= 1
        if self._left[key] == 0:
            del self._left[key]
            self.tensors += 1
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def to_orbax(src: str | Path, dst: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False,
             progress: bool = True, block_mb: float = 32, compression: bool = False, workers: int = 2,
             window: int = 4, mesh: dict[str, int] | None = None, keep_quantized: bool = False) -> dict:
    """Convert the safetensors checkpoint directory ``src`` into a v4jax Orbax directory ``dst``.
    ``src`` may also be a train.py run or one of its steps: its model is saved as with
    ``v4jax.from_run(src).save(dst)`` (there ``mesh`` and ``compression`` do not apply).

    ``dtype``: "bfloat16" or "float32", for ordinary weights (fp32-kept tensors stay fp32, tid2eid
    int32). Host memory: about ``window`` blocks of ``block_mb`` MiB (plus the decoder's fp32
    temporaries for them) and a fixed margin, independent of the checkpoint's size. ``mesh``
    (mesh axis -> size) aligns the Orbax chunks with that mesh's per-device shards (see
    ``orbax_io.stream_leaves``). ``keep_quantized``: the FP8/FP4 weights are written as stored (codes
    and E8M0 scales, what ``from_pretrained(..., quantized=True)`` holds), not dequantised. Returns
    a summary. Every argument is checked before anything is read; ``dst`` may not be, contain or
    lie inside ``src``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use bfloat16 or float32")
    block_mb = positive_mb(block_mb)
    workers = positive_int(workers, "--workers", "threads reading and dequantising blocks")
    window = positive_int(window, "--window", "blocks in flight at once")
    check_mesh(mesh)
    check_separate(src, dst)
    src = Path(src)
    run = find_run(src)
    if run is not None:
        if keep_quantized:
            raise ValueError(f"--keep-quantized keeps a checkpoint's FP8/FP4 weights as stored; {src} is a train.py "
                             "run, whose weights are full precision: leave it out")
        return _run_to_orbax(run, dst, dtype, overwrite, mesh, compression)
    config, style = read_config(src)
    check_output_dir(dst, overwrite)
    start = time.time()
    with Checkpoint(src) as ckpt:
        plan = plan_checkpoint(ckpt, config, DTYPES[dtype], directory=src)
        from v4jax.convert.names import tree_paths, unflatten  # noqa: PLC0415
        from v4jax.convert.source import blocks  # noqa: PLC0415

        sources = {s.path: s for s in plan.sources}
        specs, kept = plan.specs, {}
        if keep_quantized:  # each kept weight as {"codes", "scales"}, the layout Orbax gives a BlockScaled
            kept = {p: s for p, s in sources.items() if s.stored_format}
            specs = unflatten(specs, {p: {part: kept[p].stored_spec(part) for part in ("codes", "scales")}
                                      if p in kept else spec for p, spec in tree_paths(specs)})
        tree = stream_leaves(specs, sources, int(block_mb * 2**20), mesh, config)
        nbytes = sum(leaf.nbytes for _, leaf in tree_paths(tree))
        prog = Progress(nbytes, plan.n_tensors, "to-orbax", progress)

        for _, leaf in tree_paths(tree):
            per_lead: dict = {}
            for lead, _, _ in blocks(leaf.shape, leaf.rows):
                per_lead[lead] = per_lead.get(lead, 0) + 1
            for lead, n in per_lead.items():
                prog.expect((id(leaf), lead), n)
        try:
            with atomic_output_dir(dst, overwrite) as tmp:
                save_streaming(tmp / PARAMS, tree, compression=compression, workers=workers, window=window,
                               on_block=lambda leaf, lead, n: prog.block((id(leaf), lead), n))
                (tmp / "config.json").write_text(json.dumps(config_dict(config, style), indent=2) + "\n")
                write_marker(tmp, mesh=mesh, config_style=style, source_layout=plan.layout, dtype=dtype,
                             has_mtp=plan.has_mtp,
                             tensors=plan.n_tensors, leaves=len(plan.sources), nbytes=nbytes,
                             source_nbytes=plan.source_nbytes, formats=plan.formats, quantized=bool(kept))
        finally:
            prog.close()
    return {"layout": plan.layout, "config_style": style, "has_mtp": plan.has_mtp, "tensors": plan.n_tensors,
            "leaves": len(plan.sources), "bytes": nbytes, "source_bytes": plan.source_nbytes,
            "formats": plan.formats, "seconds": time.time() - start}


def _run_to_orbax(run, dst, dtype: str, overwrite: bool, mesh, compression: bool) -> dict:
    import jax  # noqa: PLC0415

    from v4jax.api import from_run  # noqa: PLC0415

    if mesh or compression:
        raise ValueError(f"--mesh and --compress apply to safetensors sources; {run[0]} is a train.py run: leave "
                         "them out")
    start = time.time()
    check_output_dir(dst, overwrite)
    model = from_run(*run, dtype=dtype)
    model.save(dst, overwrite=overwrite)
    leaves = jax.tree.leaves(model.params)
    return {"layout": "train.py run", "has_mtp": model.has_mtp, "tensors": len(leaves), "leaves": len(leaves),
            "bytes": sum(a.nbytes for a in leaves), "formats": {}, "seconds": time.time() - start}


__all__ = ["to_orbax", "read_config", "config_dict", "HF_STYLE", "RELEASE_STYLE"]
