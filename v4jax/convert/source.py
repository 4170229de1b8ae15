"""Plan the reading of a safetensors checkpoint into our parameter tree, checking everything first.

``plan_checkpoint(ckpt, config, dtype)`` matches every tensor of the checkpoint (either layout) to a
leaf of the tree (``v4jax.model.param_specs``), works out each tensor's format (plain float, FP8 with
block scales, packed FP4 with group scales, integer table), and collects *every* problem (missing,
unexpected, wrongly shaped, wrongly typed tensors; missing or wrong scales) before raising one
:class:`CheckpointError` that lists them all. Nothing is read but headers.

The result maps each tree leaf to a :class:`LeafSource` that reads the leaf's values in row blocks
(``read(lead, r0, r1)``), dequantised and cast, so a caller can stream a leaf of any size through a
bounded buffer: the whole checkpoint never needs to sit in memory.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from v4jax.config import ModelConfig
from v4jax.convert import quant
from v4jax.convert.checks import check_values, int_range
from v4jax.convert.names import (
    detect_layout,
    from_official,
    is_mtp_extra,
    is_routed_expert,
    official_name,
    scale_names,
    to_official,
    tree_paths,
)
from v4jax.convert.safetensors_io import Checkpoint, CheckpointError

FLOAT_KINDS = ("F32", "BF16", "F16", "F64")
INT_KINDS = ("I64", "I32")
PLAIN, FP8, FP4, INT = "plain", "fp8", "fp4", "int"
FIX = "the checkpoint is corrupt or does not belong to this config.json: download or write it again"


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One checkpoint tensor (by its name in the file) and how to decode it into a [out, in] matrix
    (or a vector / an integer table)."""

    key: str
    fmt: str  # plain | fp8 | fp4 | int
    scale_key: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,) if self.scale_key is None else (self.key, self.scale_key)


class LeafSource:
    """Reads one leaf of the parameter tree from the checkpoint, in blocks of rows.

    ``shape``/``dtype``: the leaf's. For rank >= 2 a block is ``read(lead, r0, r1)``: rows r0..r1 of
    axis -2 at the leading index ``lead`` (``()`` for a matrix, ``(e,)`` for expert e of a stacked
    expert tensor), shape [r1 - r0, shape[-1]]. For rank 1, ``read((), 0, n)`` gives the vector.
    Every block is checked as it is read (``checks.check_values``): NaN or inf in a float weight or
    its scale, or an out-of-range integer, is a CheckpointError naming the tensor and its file.
    """

    def __init__(self, ckpt: Checkpoint, path: tuple, shape, dtype, tensors: list[SourceTensor],
                 bounds: tuple[int, int] | None = None):
        self.ckpt, self.path, self.shape, self.dtype = ckpt, path, tuple(shape), np.dtype(dtype)
        self.tensors = tensors  # one per expert for a stacked leaf, else one
        self.bounds = bounds  # [lo, hi) of an integer leaf's values (checks.int_range)
        self._scales: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        return ".".join(str(k) for k in self.path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def source_nbytes(self) -> int:
        return sum(self.ckpt.nbytes(k) for t in self.tensors for k in t.keys)

    @property
    def stacked(self) -> bool:
        return len(self.shape) == 3 and len(self.tensors) > 1

    def read(self, lead: tuple, r0: int, r1: int) -> np.ndarray:
        whole = len(self.tensors) == 1  # one stored tensor, even of rank 3 (not one per expert)
        t = self.tensors[0 if whole else lead[0]]
        at = lead if whole else ()  # the block's leading index in the stored tensor
        try:
            values, scale = self._decode(t, at, r0, r1)
        except CheckpointError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self._where(t.key)}: cannot decode: {e}") from None
        try:
            check_values(values, self._where(t.key), FIX, self.bounds, at, r0)
        except CheckpointError:
            if scale is not None:  # name the scale when it is the culprit (E8M0 byte 0xff, a NaN F32 scale)
                check_values(quant.scale_values(scale), self._where(t.scale_key), FIX,
                             row0=r0 if t.fmt == FP4 else 0)
            raise
        return values

    def _decode(self, t: SourceTensor, at: tuple, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (rows r0..r1 at ``at`` decoded into the leaf's dtype, the scale they used or None)."""
        if t.fmt == PLAIN:
            return self.ckpt.get_rows(t.key, r0, r1, at).astype(self.dtype), None
        if t.fmt == INT:
            v = self.ckpt.get_rows(t.key, r0, r1)
            if v.size and (v.min() < np.iinfo(self.dtype).min or v.max() > np.iinfo(self.dtype).max):
                raise CheckpointError(f"{self._where(t.key)}: values do not fit {self.dtype}")
            return v.astype(self.dtype), None
        if t.fmt == FP8:
            scale = self._scales.get(t.scale_key)
            if scale is None:  # the whole block scale is small ([out/128, in/128]); keep it for the leaf
                scale = self._scales[t.scale_key] = self.ckpt.get(t.scale_key)
            return quant.dequant_fp8(self.ckpt.get_rows(t.key, r0, r1), scale, row0=r0, dtype=self.dtype), scale
        if t.fmt == FP4:
            scale = self.ckpt.get_rows(t.scale_key, r0, r1)
            return quant.dequant_fp4(self.ckpt.get_rows(t.key, r0, r1), scale, dtype=self.dtype), scale
        raise AssertionError(t.fmt)

    @property
    def stored_format(self) -> str | None:
        """"fp8" or "fp4" when this leaf's tensors are stored in that format (they then load as
        ``v4jax.quant.BlockScaled`` with ``quantized=True``), None for plain or integer ones."""
        fmts = {t.fmt for t in self.tensors}
        if not fmts & {FP8, FP4}:
            return None
        if len(fmts) > 1:
            raise CheckpointError(f"{self.name}: its tensors mix formats ({', '.join(sorted(fmts))}), which cannot "
                                  "be kept quantised as one array: load it without quantized=True")
        return fmts.pop()

    def stored_spec(self, part: str):
        """The shape and dtype of this leaf's stored ``part`` ("codes" or "scales"), expert axis
        included, as a ShapeDtypeStruct."""
        from v4jax.quant import block_scaled_spec  # noqa: PLC0415 (jax is imported by then)

        return getattr(block_scaled_spec(self.shape, self.stored_format), part)

    def read_stored(self, part: str, lead: tuple, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 (of axis -2) of the stored ``part`` at ``lead``, as the file holds them:
        "codes" (E4M3, or FP4 pairs as uint8) or "scales" (E8M0; F32 scales, which must be powers
        of two, converted). NaN codes or scales raise, naming the tensor."""
        whole = len(self.tensors) == 1
        t = self.tensors[0 if whole else lead[0]]
        at = lead if whole else ()
        key = t.key if part == "codes" else t.scale_key
        try:
            v = self.ckpt.get_rows(key, r0, r1, at)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self._where(key)}: cannot read: {e}") from None
        if part == "codes":
            v = v.view(np.uint8) if t.fmt == FP4 else v
        else:
            v = quant.e8m0_scales(v)
        if v is None or quant.stored_nan(v, part, t.fmt):
            what = "NaN codes" if part == "codes" else "NaN scales or F32 scales that are not powers of two"
            raise CheckpointError(f"{self._where(key)}: {what}, which cannot be kept quantised; {FIX}")
        return v

    def release(self, lead: tuple = ()) -> None:
        """Forget cached scales (call when done with an expert or the leaf)."""
        self._scales.clear()

    def _where(self, key: str) -> str:
        return f"{self.ckpt.where[key].path} tensor {key!r}"


@dataclasses.dataclass
class CheckpointPlan:
    """Everything needed to read a checkpoint into the tree: ``sources`` has one LeafSource per
    leaf of ``specs`` (a param_specs tree, without ``mtp`` when the checkpoint has none)."""

    ckpt: Checkpoint
    layout: str
    specs: dict
    sources: list[LeafSource]
    has_mtp: bool
    formats: dict[str, int]  # tensor count per format, for reporting

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def source_nbytes(self) -> int:
        return sum(s.source_nbytes for s in self.sources)

    @property
    def n_tensors(self) -> int:
        return sum(len(s.tensors) for s in self.sources)


def plan_checkpoint(ckpt: Checkpoint, config: ModelConfig, dtype, *, directory=None) -> CheckpointPlan:
    """Match ``ckpt`` against ``config``; raise CheckpointError listing all problems, or return a plan.

    ``dtype``: the dtype of the model's ordinary weights (fp32-kept leaves stay fp32, tid2eid int32).
    A checkpoint without any ``mtp.*`` tensor loads without the MTP block, with a warning.
    """
    from v4jax.model import param_specs  # noqa: PLC0415 (model imports nothing from convert)

    directory = directory or ckpt.directory
    keys = ckpt.keys()
    layout = detect_layout(keys)
    present = {to_official(k, layout): k for k in keys}
    specs = param_specs(config, dtype)
    has_mtp = "mtp" in specs
    if has_mtp and not any(n.startswith("mtp.") and not is_mtp_extra(n) for n in present):
        why = " (the transformers layout drops them)" if layout != "official" else ""
        warnings.warn(f"{directory} has no mtp.* tensors{why}: the model converts/loads without its MTP block",
                      stacklevel=3)
        specs.pop("mtp")
        has_mtp = False

    missing, wrong, used = [], [], set()
    sources, formats = [], {PLAIN: 0, FP8: 0, FP4: 0, INT: 0}
    for path, spec in tree_paths(specs):
        stacked = is_routed_expert(path)
        names = [official_name(path, e) for e in range(spec.shape[0])] if stacked else [official_name(path)]
        shape = tuple(spec.shape[1:] if stacked else spec.shape)
        tensors = []
        for name in names:
            key = present.get(name)
            if key is None:
                missing.append(from_official(name, layout))
                continue
            used.add(key)
            t, problems = _classify(ckpt, key, shape, np.dtype(spec.dtype), used)
            wrong.extend(problems)
            if t is not None:
                tensors.append(t)
                formats[t.fmt] += 1
        if len(tensors) == len(names):
            sources.append(LeafSource(ckpt, path, spec.shape, spec.dtype, tensors, int_range(config, path)))

    ignored = sorted(k for k in keys if k not in used and is_mtp_extra(to_official(k, layout)))
    if ignored:
        warnings.warn(f"{directory}: ignoring {len(ignored)} copies of the shared embedding/head under mtp.* "
                      f"({', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''}), as the release's "
                      "convert.py does", stacklevel=3)
    unexpected = sorted(k for k in keys if k not in used and k not in ignored)
    problems = []
    if missing:
        problems += [f"missing tensor: {n}" for n in missing]
    if unexpected:
        problems += [f"unexpected tensor: {k} ({ckpt.dtype_name(k)} {list(ckpt.shape(k))})" for k in unexpected]
    problems += wrong
    if problems:
        raise CheckpointError(summarise(f"{directory} ({layout} layout) does not match its config.json", problems),
                              problems)
    return CheckpointPlan(ckpt, layout, specs, sources, has_mtp, formats)


def summarise(title: str, problems: list[str], limit: int = 200) -> str:
    counts = {}
    for p in problems:
        kind = p.split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    head = f"{title}: " + ", ".join(f"{v} × {k}" for k, v in counts.items())
    lines = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    return head + "\n  " + "\n  ".join(lines)


def _classify(ckpt: Checkpoint, key: str, shape: tuple, dtype: np.dtype, used: set):
    """-> (SourceTensor or None, [problems]) for the tensor ``key`` that must decode to ``shape``."""
    kind, got = ckpt.dtype_name(key), tuple(ckpt.shape(key))
    where = f"{key} ({ckpt.where[key].path.name})"
    if np.issubdtype(dtype, np.integer):
        problems = []
        if kind not in INT_KINDS:
            problems.append(f"wrong dtype: {where} is {kind}, expected one of {'/'.join(INT_KINDS)}")
        if got != shape:
            problems.append(f"wrong shape: {where} is {list(got)}, the config implies {list(shape)}")
        return (None if problems else SourceTensor(key, INT)), problems
    if kind in FLOAT_KINDS:
        if got != shape:
            return None, [f"wrong shape: {where} is {list(got)}, the config implies {list(shape)}"]
        return SourceTensor(key, PLAIN), []
    if kind in ("F8_E4M3", "I8", "U8") and not (len(shape) == 2 and key.endswith(".weight")):
        return None, [f"wrong dtype: {where} is {kind}, but only [out, in] weight matrices may be quantised"]
    if kind == "F8_E4M3":
        problems = []
        if got != shape:
            problems.append(f"wrong shape: {where} is {list(got)}, the config implies {list(shape)}")
        scale, sp = _scale(ckpt, key, quant.fp8_scale_shape(shape), "FP8 (128×128 blocks)", used)
        problems += sp
        return (None if problems else SourceTensor(key, FP8, scale)), problems
    if kind in ("I8", "U8"):
        problems = []
        if shape[1] % 2 or got != quant.fp4_packed_shape(shape):
            problems.append(f"wrong shape: {where} is {list(got)}; packed FP4 for the config's {list(shape)} "
                            f"is {list(quant.fp4_packed_shape(shape))}")
        scale, sp = _scale(ckpt, key, quant.fp4_scale_shape(shape), "FP4 (groups of 32)", used)
        problems += sp
        return (None if problems else SourceTensor(key, FP4, scale)), problems
    return None, [f"wrong dtype: {where} is {kind}, expected a float (F32/BF16), F8_E4M3 or packed FP4 (I8)"]


def _scale(ckpt: Checkpoint, key: str, shape: tuple, what: str, used: set):
    for name in scale_names(key):
        if name in ckpt:
            used.add(name)
            kind, got = ckpt.dtype_name(name), tuple(ckpt.shape(name))
            problems = []
            if kind not in ("F8_E8M0", "F32"):
                problems.append(f"wrong dtype: scale {name} is {kind}, expected F8_E8M0 or F32")
            if got != shape:
                problems.append(f"wrong shape: scale {name} of {what} weight {key} is {list(got)}, expected "
                                f"{list(shape)}")
            return name, problems
    return None, [f"missing scale: {scale_names(key)[0]} for the {what} weight {key}"]


def rows_per_block(shape, itemsize: int, block_bytes: int) -> int:
    """Rows of axis -2 per block so that a block [rows, shape[-1]] stays within ``block_bytes``
    (at least one row; a multiple of 128 when that many fit, to match FP8 scale blocks)."""
    if len(shape) < 2:
        return max(1, shape[0] if shape else 1)
    rows = max(1, block_bytes // max(1, shape[-1] * itemsize))
    if rows >= quant.FP8_BLOCK:
        rows -= rows % quant.FP8_BLOCK
    return min(rows, shape[-2])


def blocks(shape, rows: int):
    """Yield (lead, r0, r1) covering an array of ``shape`` in blocks of ``rows`` rows of axis -2."""
    if len(shape) < 2:
        yield (), 0, (shape[0] if shape else 1)
        return
    for lead in np.ndindex(*shape[:-2]):
        for r0 in range(0, shape[-2], rows):
            yield lead, r0, min(shape[-2], r0 + rows)
