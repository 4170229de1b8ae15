"""Safetensors reading and writing, tensor by tensor, with the dtypes the DeepSeek-V4 release uses.

Reading: we parse the header ourselves (8-byte little-endian length, then JSON) and read only the
bytes asked for with ``os.pread`` (a whole tensor, or a range of its rows), so host memory holds one
tensor (or one block of rows) at a time and nothing is memory-mapped. numpy has no float8/bfloat16:
those come from ``ml_dtypes``.

Writing: :class:`SafetensorsWriter` takes the full list of tensors (name, dtype, shape) up front,
writes the header, then accepts each tensor's bytes in order, in as many pieces as the caller
likes, and checks that every tensor got exactly its size. The file is written under a temporary
name and renamed on :meth:`SafetensorsWriter.close`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint (safetensors, a v4jax Orbax directory, or a training step) is missing,
    truncated, corrupt or does not match the config. The message names the file or directory.

    ``problems`` lists every problem found (one line each) when several were found at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


def dtype_name(dtype) -> str:
    """numpy dtype -> safetensors dtype string ("BF16", "F8_E4M3", ...)."""
    try:
        return DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name") from None


class SafetensorsFile:
    """One .safetensors file: ``keys()``, ``shape(name)``, ``dtype_name(name)``, ``get(name)`` (a numpy
    array of the whole tensor) and ``get_rows(name, r0, r1, lead)`` (rows r0..r1 of the axis after the leading index ``lead``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self):
        size = os.fstat(self._fd).st_size
        self.size = size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{self.path} is truncated or empty: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(f"{self.path} is truncated or not a safetensors file "
                                  f"(header length {n}, file size {size})")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} has a corrupt header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} has a corrupt header: not a JSON object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._base = 8 + n
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        for name, e in header.items():
            if (not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e)
                    or not isinstance(e["shape"], list) or not all(map(whole, e["shape"]))
                    or not isinstance(e["data_offsets"], list) or len(e["data_offsets"]) != 2
                    or not all(map(whole, e["data_offsets"]))):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a corrupt header entry {e!r}")
            if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
            start, end = e["data_offsets"]
            want = math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize
            if end - start != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} is corrupt: it has {end - start} bytes, "
                                      f"its shape {e['shape']} and dtype {e['dtype']} need {want}")
            if self._base + end > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte "
                                      f"{self._base + end}, past the end of the file ({size} bytes)")
        # As the reference reader requires: the tensors tile the data exactly, in order, with no gap,
        # overlap or trailing bytes (two tensors sharing bytes, or bytes no tensor owns, mean a
        # damaged or hand-edited file).
        at = 0
        for name, e in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
            if e["data_offsets"][0] != at:
                raise CheckpointError(f"{self.path}: tensor {name!r} starts at data byte {e['data_offsets'][0]}, "
                                      f"expected {at}: the tensors overlap or leave a gap; the file is corrupt")
            at = e["data_offsets"][1]
        if self._base + at != size:
            raise CheckpointError(f"{self.path} has {size - self._base - at} bytes after its last tensor: the file "
                                  "is corrupt")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.dtype_name(name)]

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name]["data_offsets"]
        return end - start

    def _read(self, name: str, offset: int, count: int) -> bytearray:
        buf = bytearray(count)
        view = memoryview(buf)
        done = 0
        while done < count:
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{self.path}: reading tensor {name!r} failed: {e.strerror}") from None
            if got == 0:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")
            done += got
        return buf

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        start, end = e["data_offsets"]
        buf = self._read(name, self._base + start, end - start)
        return np.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape(e["shape"])

    def get_rows(self, name: str, r0: int, r1: int, lead: tuple = ()) -> np.ndarray:
        """Rows [r0, r1) of axis ``len(lead)`` at the leading index ``lead`` (the first axis for
        ``lead=()``; the whole tensor for rank 0)."""
        e = self._entries[name]
        shape = e["shape"]
        if not shape:
            return self.get(name)
        k = len(lead)
        if k >= len(shape) or any(not 0 <= i < n for i, n in zip(lead, shape)) or not 0 <= r0 <= r1 <= shape[k]:
            raise IndexError(f"rows [{r0}, {r1}) at {lead} outside tensor {name!r} of shape {shape}")
        row = int(np.prod(shape[k + 1:], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
        first = int(np.ravel_multi_index(lead, shape[:k])) * shape[k] if k else 0
        start = e["data_offsets"][0]
        buf = self._read(name, self._base + start + (first + r0) * row, (r1 - r0) * row)
        return np.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape([r1 - r0] + list(shape[k + 1:]))

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _shard_names(index: Path, weight_map: dict) -> list[str]:
    """The file names of an index's weight_map, each checked: a string naming a file inside the
    checkpoint directory. A name like ``../../etc/passwd`` or ``/etc/passwd`` is refused here,
    before any file is opened."""
    names = []
    for key, name in weight_map.items():  # JSON keys are always strings; values can be anything
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: weight_map entry {key!r}: {name!r} must map the tensor to a file name "
                                  "(a string)")
        path = PurePosixPath(name)
        if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
            raise CheckpointError(f"{index}: weight_map entry {key!r} names the file {name!r}, which is not inside "
                                  f"{index.parent}; shard files must be named relative to the checkpoint directory")
        names.append(name)
    return names


class Checkpoint:
    """All the .safetensors files of a directory (through model.safetensors.index.json when present)."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        index = self.directory / self.INDEX
        weight_map = None
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise KeyError("weight_map")
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
            names = sorted(set(_shard_names(index, weight_map)))
            absent = [n for n in names if not (self.directory / n).is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shard files that do not exist: {', '.join(absent)}")
        else:
            names = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not names:
            raise CheckpointError(f"no *.safetensors files in {self.directory}")
        self.files: dict[str, SafetensorsFile] = {}
        try:
            for n in names:
                self.files[n] = SafetensorsFile(self.directory / n)
        except BaseException:
            self.close()
            raise
        self.where: dict[str, SafetensorsFile] = {}
        duplicates = []
        for f in self.files.values():
            for k in f.keys():
                if k in self.where:
                    duplicates.append(f"{k} (in {self.where[k].path.name} and {f.path.name})")
                self.where[k] = f
        if duplicates:
            self.close()
            raise CheckpointError(f"{self.directory}: tensors stored twice: {', '.join(duplicates[:20])}")
        if weight_map is not None:
            wrong = sorted(k for k, fn in weight_map.items() if self.where.get(k) is not self.files[fn])
            if wrong:
                self.close()
                raise CheckpointError(f"{index} lists tensors not found in the file it names: "
                                      f"{', '.join(wrong[:20])}" + (" ..." if len(wrong) > 20 else ""))

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype_name(self, name: str) -> str:
        return self.where[name].dtype_name(name)

    def nbytes(self, name: str) -> int:
        return self.where[name].nbytes(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def get_rows(self, name: str, r0: int, r1: int, lead: tuple = ()) -> np.ndarray:
        return self.where[name].get_rows(name, r0, r1, lead)

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# Writing


class SafetensorsWriter:
    """Write one .safetensors file whose tensors are known in advance, streaming their bytes.

    ``entries``: [(name, dtype, shape)] in file order. Then call ``write(name, array_or_bytes)`` for
    each tensor in that order, once or in several consecutive pieces (C order), and ``close()``.
    The data goes to ``path`` + ".partial" and is renamed to ``path`` when every byte is written.
    """

    def __init__(self, path: str | Path, entries, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order = []
        offset = 0
        for name, dtype, shape in entries:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + n]}
            self._order.append((name, n))
            offset += n
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
        self._fh = open(self._partial, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._i = 0
        self._done = 0  # bytes of the current tensor written
        self.tensor_done = False

    def write(self, name: str, data) -> None:
        if self._i >= len(self._order):
            raise RuntimeError(f"{self.path}: tensor {name!r} written after the last tensor")
        want, size = self._order[self._i]
        if name != want:
            raise RuntimeError(f"{self.path}: expected bytes of {want!r}, got {name!r}")
        if isinstance(data, np.ndarray):
            buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        else:
            buf = memoryview(data).cast("B")
        if self._done + len(buf) > size:
            raise RuntimeError(f"{self.path}: tensor {name!r} got more than its {size} bytes")
        self._fh.write(buf)
        self._done += len(buf)
        self.tensor_done = self._done == size  # the last write completed a tensor
        if self.tensor_done:
            self._i += 1
            self._done = 0

    def close(self) -> None:
        if self._i != len(self._order):
            name = self._order[self._i][0]
            self.abort()
            raise RuntimeError(f"{self.path}: closed before tensor {name!r} was complete")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._partial.unlink(missing_ok=True)
