"""Orbax -> safetensors: a complete checkpoint in the release's layout or the ``transformers`` one.

Output: ``config.json`` (release style for the official layout, transformers style for the HF
layout), ``model.safetensors.index.json`` and shards ``model-0000i-of-0000N.safetensors`` of at most
``max_shard_bytes`` each (a tensor is never split, so a single larger tensor gets a shard of its
own). Quantisation (spec §3.3), as in the release:

* ``none``: every weight in the plain dtype;
* ``fp8``: the release's FP8 matrices (attention wq_a/wq_b/wkv/wo_a/wo_b, indexer wq_b, shared
  experts, MTP e_proj/h_proj) *and* the routed experts as FP8 e4m3 with E8M0 128×128 block scales
  (the layout of the "Base" checkpoints);
* ``fp8+fp4``: the same, but routed experts as packed FP4 e2m1 with E8M0 scales per 32 inputs
  (the layout of the released instruct checkpoints).

Everything else is written in the plain dtype (``auto``: bf16 when quantising, as released; else the
Orbax checkpoint's dtype); fp32-kept tensors (mHC, sinks, position and router biases) as F32 and
``tid2eid`` as I64. The transformers layout has no MTP block: it is left out, with a warning.

Streaming: tensors are read from Orbax in blocks of rows, converted and appended to the shard being
written; host memory holds a few blocks plus one quantised weight's scales, whatever the model size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from v4jax.config import ModelConfig
from v4jax.convert import quant
from v4jax.convert.checks import check_separate, positive_int, positive_mb
from v4jax.convert.names import (
    HF,
    OFFICIAL,
    RELEASE_STYLE,
    from_official,
    is_routed_expert,
    official_name,
    scale_name,
    tree_paths,
)
from v4jax.convert.orbax_io import (
    PARAMS,
    OrbaxParams,
    TreeParams,
    atomic_output_dir,
    check_output_dir,
    is_orbax_checkpoint,
    read_marker,
)
from v4jax.convert.safetensors_io import Checkpoint, CheckpointError, SafetensorsWriter
from v4jax.convert.source import summarise
from v4jax.schema import info_at
from v4jax.workdir import find_run

QUANTIZE = ("none", "fp8", "fp8+fp4")
BF16 = np.dtype(ml_dtypes.bfloat16)
PLAIN_DTYPES = {"bfloat16": BF16, "float32": np.dtype(np.float32)}
INDEX = Checkpoint.INDEX


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (at least 1)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    n = 0
    if m and not isinstance(text, bool):
        unit = (m.group(2) or "").upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        n = int(float(m.group(1)) * base**{"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")])
    if n < 1:
        raise ValueError(f"--max-shard-size {text!r}: use a size of at least 1 byte, e.g. 5GB, 500MB or a number of "
                         "bytes")
    return n


@dataclasses.dataclass
class OutTensor:
    """One tensor of the output: its name (in the output layout), dtype, shape, and ``pieces()``: its
    data as a list of zero-argument callables, each giving the next C-order piece. Pieces may be
    computed concurrently, except ``deferred`` ones (a quantised weight's scale), which are computed
    when their turn to be written comes, after all earlier pieces."""

    name: str
    dtype: np.dtype
    shape: tuple
    pieces: Callable[[], list[Callable[[], np.ndarray]]]
    deferred: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class _ScaleBuffer:
    """The scale of one quantised weight, filled block by block by the weight's pieces (possibly from
    several threads), handed out once for writing and then dropped (so only the scales of weights
    in flight are held)."""

    def __init__(self, shape):
        self.shape, self._array, self._lock = tuple(shape), None, threading.Lock()

    def put(self, rows: slice, values: np.ndarray):
        with self._lock:
            if self._array is None:
                self._array = np.zeros(self.shape, quant.E8M0)
            self._array[rows] = values

    def take(self) -> np.ndarray:
        with self._lock:
            out, self._array = self._array, None
        return out if out is not None else np.zeros(self.shape, quant.E8M0)


def _row_blocks(n_rows: int, row_bytes: int, block_bytes: int, align: int = 1):
    rows = max(1, block_bytes // max(1, row_bytes))
    rows = max(align, rows - rows % align)
    return [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]


class QuantisationError:
    """What quantising cost, per group of tensors: the relative RMS error sqrt(sum (w - q(w))^2 /
    sum w^2) of the weights as written, summed block by block (from the writer's threads). Zero for
    weights already on the FP8/FP4 grid (e.g. converted from the release); for bf16/fp32 weights
    trained or initialised off the grid, FP8 costs about 2-3% and FP4 about 10% (docs/benchmarks.md)."""

    def __init__(self):
        self._sums: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def add(self, path: tuple, w: np.ndarray, written: np.ndarray) -> None:
        w = np.asarray(w, np.float32).ravel()
        d = w - written.ravel()
        group = _group(path)
        with self._lock:
            err, ref = self._sums.get(group, (0.0, 0.0))
            self._sums[group] = (err + float(d @ d), ref + float(w @ w))

    def relative(self) -> dict[str, float]:
        return {g: (err / ref) ** 0.5 if ref else 0.0 for g, (err, ref) in sorted(self._sums.items())}


def _group(path: tuple) -> str:
    names = [k for k in path if isinstance(k, str)]
    for key, group in (("experts", "routed experts"), ("shared_experts", "shared experts"), ("indexer", "indexer"),
                       ("attn", "attention")):
        if key in names:
            return group
    return "MTP projections" if names[0] == "mtp" else "other"


class _Exporter:
    def __init__(self, params: OrbaxParams, config: ModelConfig, layout: str, quantize: str, plain: np.dtype,
                 block_bytes: int, has_mtp: bool):
        self.params, self.config, self.layout, self.quantize = params, config, layout, quantize
        self.plain, self.block_bytes, self.has_mtp = plain, block_bytes, has_mtp
        self.error = QuantisationError()

    def tensors(self, specs) -> list[OutTensor]:
        out = []
        for path, spec in tree_paths(specs):
            export = info_at(self.config, path).export  # as declared (v4jax.params)
            if export == "experts":  # one tensor per routed expert, FP8 or FP4 when quantising
                fmt = {"none": "plain", "fp8": "fp8", "fp8+fp4": "fp4"}[self.quantize]
                for e in range(spec.shape[0]):
                    out += self._tensor(path, (e,), official_name(path, e), spec.shape[1:], fmt)
            else:
                fmt = "plain" if export == "fp8" and self.quantize == "none" else export
                out += self._tensor(path, (), official_name(path), spec.shape, fmt)
        return out

    def _name(self, official: str) -> str:
        return from_official(official, self.layout)

    def _read(self, path, lead, r0, r1) -> np.ndarray:
        return self.params.read(path, lead, r0, r1)

    def _tensor(self, path, lead, official, shape, fmt) -> list[OutTensor]:
        shape = tuple(shape)
        name = self._name(official)
        read = functools.partial(self._read, path, lead)
        if fmt in ("plain", "f32", "int"):
            dtype = {"plain": self.plain, "f32": np.dtype(np.float32), "int": np.dtype(np.int64)}[fmt]

            def plain_pieces():
                if len(shape) < 2:
                    return [lambda: read(0, shape[0]).astype(dtype)]
                return [functools.partial(lambda a, b: read(a, b).astype(dtype), r0, r1)
                        for r0, r1 in _row_blocks(shape[0], shape[1] * 4, self.block_bytes)]

            return [OutTensor(name, dtype, shape, plain_pieces)]
        if len(shape) != 2:
            raise AssertionError((path, shape))
        if getattr(self.params, "kept", {}).get(path) == fmt:
            return self._stored(path, lead, official, shape, fmt)
        if fmt == "fp8":
            scale = _ScaleBuffer(quant.fp8_scale_shape(shape))

            def fp8_piece(r0, r1):
                w = read(r0, r1)
                q, s = quant.quant_fp8(w, what=official)
                scale.put(slice(r0 // quant.FP8_BLOCK, r0 // quant.FP8_BLOCK + s.shape[0]), s)
                self.error.add(path, w, quant.dequant_fp8(q, s))  # the block starts a 128-row scale block
                return q

            blocks = _row_blocks(shape[0], shape[1] * 4, self.block_bytes, align=quant.FP8_BLOCK)
            return [OutTensor(name, quant.E4M3, shape, lambda: [functools.partial(fp8_piece, *b) for b in blocks]),
                    OutTensor(self._name(scale_name(official)), quant.E8M0, scale.shape, lambda: [scale.take],
                              deferred=True)]
        scale = _ScaleBuffer(quant.fp4_scale_shape(shape))

        def fp4_piece(r0, r1):
            w = read(r0, r1)
            q, s = quant.quant_fp4(w, what=official)
            scale.put(slice(r0, r1), s)
            self.error.add(path, w, quant.dequant_fp4(q, s))
            return q

        blocks = _row_blocks(shape[0], shape[1] * 4, self.block_bytes)
        return [OutTensor(name, np.dtype(np.int8), quant.fp4_packed_shape(shape),
                          lambda: [functools.partial(fp4_piece, *b) for b in blocks]),
                OutTensor(self._name(scale_name(official)), quant.E8M0, scale.shape, lambda: [scale.take],
                          deferred=True)]

    def _stored(self, path, lead, official, shape, fmt) -> list[OutTensor]:
        """A weight the Orbax directory keeps in ``fmt`` already: its codes and scales copied as they
        are (re-encoding its values could pick a smaller scale for a block whose largest code was
        rounded down, giving other bytes for the same values)."""
        read = functools.partial(self.params.read_stored, path, lead)
        codes_shape, scales_shape, dtype = ((shape, quant.fp8_scale_shape(shape), quant.E4M3) if fmt == "fp8" else
                                            (quant.fp4_packed_shape(shape), quant.fp4_scale_shape(shape),
                                             np.dtype(np.int8)))
        blocks = _row_blocks(shape[0], codes_shape[1], self.block_bytes)
        return [OutTensor(self._name(official), dtype, codes_shape,
                          lambda: [functools.partial(lambda r0, r1: read("codes", r0, r1).view(dtype), *b)
                                   for b in blocks]),
                OutTensor(self._name(scale_name(official)), quant.E8M0, scales_shape,
                          lambda: [lambda: read("scales", 0, scales_shape[0]).view(quant.E8M0)])]


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Fill shards in order up to ``max_shard_bytes``; a quantised weight and its scale stay together."""
    groups: list[list[OutTensor]] = []
    for t in tensors:
        if t.name.endswith(".scale") and groups:
            groups[-1].append(t)
        else:
            groups.append([t])
    shards, current, size = [], [], 0
    for g in groups:
        n = sum(t.nbytes for t in g)
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current += g
        size += n
    if current:
        shards.append(current)
    return shards


def output_config(config: ModelConfig, layout: str, quantize: str, plain: np.dtype) -> dict:
    dtype_name = {BF16: "bfloat16", np.dtype(np.float32): "float32"}[np.dtype(plain)]
    if layout == OFFICIAL:
        out = config.to_release_dict()
        out["torch_dtype"] = dtype_name
    else:
        out = config.to_hf_dict()
        out["dtype"] = dtype_name
    if quantize != "none":
        out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        if quantize == "fp8+fp4":
            out["expert_dtype"] = "fp4"
    return out


def check_params(params: OrbaxParams, specs, where) -> None:
    """All differences between the stored leaves and the config's tree, reported together."""
    want = {p: s for p, s in tree_paths(specs)}
    problems = []
    for p, s in want.items():
        name = ".".join(map(str, p))
        if p not in params.leaves:
            problems.append(f"missing tensor: {name}")
            continue
        shape, dtype = params.leaves[p]
        if shape != tuple(s.shape):
            problems.append(f"wrong shape: {name} is {list(shape)}, the config implies {list(s.shape)}")
        want_int = np.issubdtype(np.dtype(s.dtype), np.integer)
        if want_int != np.issubdtype(dtype, np.integer) or not (want_int or np.issubdtype(dtype, np.floating)
                                                              or dtype == BF16):
            problems.append(f"wrong dtype: {name} is {dtype}, expected {'an integer' if want_int else 'a float'}")
    problems += [f"unexpected tensor: {'.'.join(map(str, p))}" for p in params.leaves if p not in want]
    if problems:
        raise CheckpointError(summarise(f"{where} does not match its config.json", problems), problems)


def to_safetensors(src: str | Path, dst: str | Path, *, layout: str | None = None, quantize: str = "none",
                   dtype: str = "auto", max_shard_bytes: int | str = "5GB", overwrite: bool = False,
                   progress: bool = True, block_mb: float = 32, config_path: str | Path | None = None,
                   workers: int = 2, window: int = 4) -> dict:
    """Write the Orbax checkpoint ``src`` (made by ``to_orbax`` or ``Model.save``), or a train.py run
    or one of its steps (its model, through ``v4jax.from_run``), as a safetensors checkpoint at ``dst``.

    ``layout``: "official" or "hf" (default: the layout ``src`` was converted from). Returns a summary,
    with ``quantisation_error``: the relative RMS error of the quantised weights per tensor group
    (``QuantisationError``; quantising is exact only for weights already on the FP8/FP4 grid).
    Everything is checked before anything is written (``dst`` may not be, contain or lie inside
    ``src``); ``dst`` appears only when complete.
    """
    from v4jax.model import param_specs  # noqa: PLC0415

    start = time.time()
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZE)}")
    if dtype not in ("auto", *PLAIN_DTYPES):
        raise ValueError(f"--dtype {dtype!r}: use auto, bfloat16 or float32")
    block_mb = positive_mb(block_mb)
    workers = positive_int(workers, "--workers", "threads reading and quantising blocks")
    window = positive_int(window, "--window", "blocks in flight at once")
    max_shard_bytes = parse_size(max_shard_bytes)
    check_separate(src, dst)
    src = Path(src)
    run = find_run(src)
    if run is not None:  # a run's model, held in memory (a run is trained on hosts that hold it)
        from v4jax.api import from_run  # noqa: PLC0415

        model = from_run(*run, dtype="float32")
        marker, config, params_dir = {}, model.config, src
    elif is_orbax_checkpoint(src):
        marker = read_marker(src)
        config = ModelConfig.from_json(config_path or src / "config.json")
        params_dir = src / PARAMS
    else:
        if config_path is None:
            raise CheckpointError(f"{src} is not a v4jax Orbax checkpoint (no v4jax_checkpoint.json); for a bare "
                                  "Orbax params checkpoint pass --config CONFIG.json")
        marker = {}
        config = ModelConfig.from_json(config_path)
        params_dir = src / PARAMS if (src / PARAMS).is_dir() else src
    layout = layout or marker.get("source_layout", OFFICIAL)
    if layout not in (OFFICIAL, HF):
        raise ValueError(f"--layout {layout!r}: use official or hf")
    check_output_dir(dst, overwrite)

    params = TreeParams(model.params, str(src)) if run is not None else OrbaxParams(params_dir, config, decode=True)
    specs = param_specs(config, BF16)
    if "mtp" in specs and not any(p[0] == "mtp" for p in params.leaves):
        specs.pop("mtp")  # converted from a checkpoint without MTP: the stored tree has none
    check_params(params, specs, params_dir)
    if layout == HF and "mtp" in specs:
        warnings.warn("the transformers layout has no MTP block: mtp.* tensors are left out", stacklevel=2)
        specs.pop("mtp")
    elif "mtp" not in specs and config.num_nextn_predict_layers and layout == OFFICIAL:
        warnings.warn(f"{src} has no MTP block (converted from a checkpoint without one): the output has no "
                      "mtp.* tensors", stacklevel=2)
    if layout == HF and quantize != "none":
        warnings.warn("quantised weights in the transformers layout keep the release's `.scale` tensors; v4jax "
                      "reads them, transformers' own loader has not been tested on them", stacklevel=2)
    if dtype == "auto":  # as released when quantising, else as stored
        plain = BF16 if quantize != "none" else _stored_param_dtype(params, specs)
    else:
        plain = PLAIN_DTYPES[dtype]
    if quantize == "fp8+fp4":
        odd = [".".join(map(str, p)) for p, s in tree_paths(specs) if is_routed_expert(p) and s.shape[-1] % 2]
        if odd:
            raise CheckpointError(f"FP4 packs two columns per byte; these experts have an odd number: {odd}")
    exporter = _Exporter(params, config, layout, quantize, plain, int(block_mb * 2**20), "mtp" in specs)
    tensors = exporter.tensors(specs)
    shards = plan_shards(tensors, max_shard_bytes)
    cfg = output_config(config, layout, quantize, plain)  # before writing: the release style cannot hold every config
    total = sum(t.nbytes for t in tensors)

    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="to-safetensors", dynamic_ncols=True)
    done = 0
    weight_map = {}
    with atomic_output_dir(dst, overwrite) as tmp, \
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="v4jax-quant") as pool:
        n = len(shards)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            writer = SafetensorsWriter(tmp / fname, [(t.name, t.dtype, t.shape) for t in shard])
            try:
                for t, piece in _pipeline(pool, shard, window):
                    writer.write(t.name, piece)
                    if bar is not None:
                        bar.update(piece.nbytes)
                    if writer.tensor_done:
                        weight_map[t.name] = fname
                        done += 1
                        if bar is not None:
                            bar.set_postfix_str(f"{done}/{len(tensors)} tensors", refresh=False)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if bar is not None:
        bar.close()
    return {"tensors": len(tensors), "bytes": total, "shards": len(shards), "layout": layout,
            "config_style": RELEASE_STYLE if layout == OFFICIAL else "hf", "quantize": quantize,
            "dtype": str(np.dtype(plain)), "seconds": time.time() - start,
            "quantisation_error": exporter.error.relative()}


def _pipeline(pool, shard: list[OutTensor], window: int):
    """Yield (tensor, piece) in file order while up to ``window`` pieces are computed in ``pool``."""
    work = ((t, fn, t.deferred) for t in shard for fn in t.pieces())
    pending: collections.deque = collections.deque()
    try:
        for t, fn, deferred in work:
            pending.append((t, fn if deferred else pool.submit(fn), deferred))
            while sum(not d for _, _, d in pending) >= window:
                yield _pop(pending)
        while pending:
            yield _pop(pending)
    finally:
        for _, f, d in pending:
            if not d:
                f.cancel()


def _pop(pending):
    t, f, deferred = pending.popleft()
    return t, (f() if deferred else f.result())


def _stored_param_dtype(params: OrbaxParams, specs) -> np.dtype:
    """The dtype the Orbax checkpoint keeps ordinary weights in (the first non-fp32-kept float leaf)."""
    for path, spec in tree_paths(specs):
        if np.dtype(spec.dtype) == BF16:
            dt = params.leaves[path][1]
            return dt if dt in PLAIN_DTYPES.values() else np.dtype(np.float32)
    return BF16
