"""Lazy safetensors reading, tensor by tensor, with the dtypes the DeepSeek-V4 release uses.

We read the header ourselves (8-byte little-endian length, then JSON) and memory-map the file, so
only the tensor asked for is paged in. numpy has no float8/bfloat16: those come from ``ml_dtypes``.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated, corrupt or does not match the config."""


class SafetensorsFile:
    """One .safetensors file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)`` (a numpy copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        size = self.path.stat().st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{self.path} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(self._fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} has a corrupt header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._base = 8 + n
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            start, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - start != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - start} bytes, its shape needs {want}")
            if self._base + end > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name]["data_offsets"]
        return end - start

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        start, end = e["data_offsets"]
        raw = self._map[self._base + start : self._base + end] if self._map is not None else b""
        return np.frombuffer(raw, dtype=DTYPES[e["dtype"]]).reshape(e["shape"]).copy()

    def close(self):
        if self._map is not None:
            self._map.close()
        self._fh.close()


class Checkpoint:
    """All the .safetensors files of a directory (through model.safetensors.index.json when present)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in self.directory.glob("*.safetensors"))
            weight_map = None
        if not names:
            raise CheckpointError(f"no *.safetensors files in {self.directory}")
        self.files = {n: SafetensorsFile(self.directory / n) for n in names}
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for k in f.keys():
                self.where[k] = f
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self.where)
            if missing:
                raise CheckpointError(f"the index lists tensors not found in their files: {missing[:10]}")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def close(self):
        for f in self.files.values():
            f.close()
