"""v4jax's Orbax checkpoint directory: streaming writes, block reads, and restore onto devices.

Layout of a converted directory::

    DST/
      config.json            the model config, in the style of the source (release or transformers)
      v4jax_checkpoint.json  format marker: config style, source layout, dtype, MTP present, sizes
      params/                an ordinary Orbax PyTree checkpoint of the parameter tree
                             (OCDBT + zarr; ``layers`` is a list; readable by
                             ``ocp.StandardCheckpointer().restore(DST / "params", target)``)

The marker is written last, and the whole directory is built under a hidden temporary name and
renamed when complete (``atomic_output_dir``), so a directory with a marker is always finished.

**Streaming.** Orbax's handlers want every leaf in memory when ``save`` starts. Here each leaf is a
:class:`StreamLeaf` (shape, dtype and a ``read(lead, r0, r1)`` callback), and a private type handler
writes it through TensorStore block by block: the zarr chunks are blocks of rows (one expert at a
time for stacked experts), each block is produced by the callback (read from the source and
dequantised) in a small thread pool and written as whole chunks, and at most ``window`` blocks are
in flight. Host memory is therefore bounded by about ``window`` × (block size + the decoder's
temporaries) plus a fixed margin, whatever the size of the model or of any one tensor. The files
are the same as Orbax's own numpy handler writes (the leaves are recorded as ``np.ndarray``), so
restoring needs nothing from this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import functools
import gc
import json
import os
import re
import shutil
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from v4jax.convert.checks import check_mesh, check_values, int_range
from v4jax.convert.names import unflatten
from v4jax.convert.quant import FP8_BLOCK, dequant_fp4, dequant_fp8, stored_nan
from v4jax.convert.safetensors_io import CheckpointError
from v4jax.convert.source import blocks, rows_per_block
from v4jax.multihost import barrier, is_writer, on_process_0

MARKER = "v4jax_checkpoint.json"
PARAMS = "params"
FORMAT = "v4jax-orbax"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Atomic output directories


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False):
    """Yield a fresh temporary directory next to ``dst``; rename it to ``dst`` if the block succeeds,
    delete it if the block raises (or is interrupted). An existing ``dst`` is an error unless
    ``overwrite``, in which case it is replaced only once the new directory is complete. Without
    ``overwrite`` the rename itself refuses a ``dst`` that appeared meanwhile (another run writing
    the same output): FileExistsError, the other output kept and ours deleted.

    In a multi-host job every process enters it (a collective save, ``Model.save``): process 0
    checks ``dst`` and makes the one temporary directory (on a filesystem every host sees), every
    process writes its part into it, and process 0 publishes it once all have finished. A check
    that fails on process 0 raises there and, as an OSError with its message, on the others."""
    dst = Path(dst).absolute()
    tmp = Path(on_process_0(lambda: str(_claim_partial(dst, overwrite))))
    try:
        yield tmp
        barrier(f"v4jax output {dst} written")
        on_process_0(lambda: _publish(tmp, dst, overwrite))
    except BaseException:
        if is_writer():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _claim_partial(dst: Path, overwrite: bool) -> Path:
    """The checked destination's empty temporary directory, ``.NAME.partial-PID`` beside it."""
    check_output_dir(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, dst: Path, overwrite: bool) -> str:
    if overwrite and os.path.lexists(dst):
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        rename_no_replace(tmp, dst)
    return ""


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename the directory ``src`` to ``dst`` atomically, or raise FileExistsError if ``dst`` exists.

    ``os.rename`` would replace an empty directory ``dst`` without a word (and checking first leaves
    a gap another process can use). Linux's renameat2(RENAME_NOREPLACE) checks and renames in one
    step. Where it is missing (other systems, filesystems without the flag), ``dst`` is claimed
    with ``mkdir`` (which fails if it exists, atomically) and the complete directory renamed onto
    that empty claim: the same guarantee, with an empty ``dst`` visible for a moment.
    """
    taken = FileExistsError(f"{dst} appeared while the output was being written (another run writing the same "
                            "output?): it was left as it is and nothing was written; choose another destination, "
                            "or pass --overwrite to replace it")
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise taken
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # those mean: no such flag here
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    try:
        os.mkdir(dst)
    except FileExistsError:
        raise taken from None
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1  # from Linux's <fcntl.h> and <linux/fs.h>


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2 (2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _remove_stale(dst: Path) -> None:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` left by runs that were killed (their PID is gone)."""
    for p in dst.parent.glob(f".{dst.name}.*-*"):
        kind, _, pid = p.name[len(dst.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def check_output_dir(dst: str | Path, overwrite: bool) -> None:
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists: choose another --dst or pass --overwrite")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")


# --------------------------------------------------------------------------------------------------
# Streaming writer


@dataclasses.dataclass(eq=False)
class StreamLeaf:
    """A leaf to save without holding it: ``read(lead, r0, r1)`` returns rows r0..r1 of axis -2 at
    leading index ``lead`` (see ``source.blocks``); vectors are read whole as ``read((), 0, n)``."""

    shape: tuple
    dtype: np.dtype
    read: Callable
    rows: int  # rows per block (and per zarr chunk) along axis -2
    cols: int | None = None  # zarr chunk width along axis -1 (default: the whole row)

    @property
    def size(self) -> int:  # Orbax checks leaves for zero size
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def chunk_shape(self) -> list[int]:
        if len(self.shape) < 2:
            return [max(1, s) for s in self.shape]
        return [1] * (len(self.shape) - 2) + [self.rows, self.cols or self.shape[-1]]


def _streaming_handler_class():
    import orbax.checkpoint as ocp  # noqa: PLC0415
    import tensorstore as ts  # noqa: PLC0415
    from orbax.checkpoint import future as ocp_future  # noqa: PLC0415

    class StreamingHandler(ocp.type_handlers.NumpyHandler):
        """Writes StreamLeaf values block by block; records them as ordinary numpy leaves."""

        def __init__(self, workers: int, window: int, on_block: Callable | None):
            super().__init__()
            self._workers, self._window, self._on_block = workers, window, on_block
            self.cancelled = threading.Event()  # set by the caller to stop writing (e.g. on Ctrl-C)
            self.idle = threading.Event()  # set while no write is running
            self.idle.set()

        async def serialize(self, values, infos, args=None):
            return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos),
                                                                      name="v4jax_stream")]

        async def _open(self, leaf: StreamLeaf, info):
            await info.await_path_creation()
            use_ocdbt = info.is_ocdbt_checkpoint
            process = _process_index(use_ocdbt)
            tspec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=use_ocdbt, global_shape=tuple(leaf.shape), local_shape=tuple(leaf.shape),
                dtype=np.dtype(leaf.dtype), process_index=process)
            tspec["metadata"]["chunks"] = leaf.chunk_shape()  # zarr v2 (Orbax's default format)
            tspec["dtype"] = np.dtype(leaf.dtype).name
            return await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)

        async def _write_all(self, values, infos):
            self.idle.clear()
            try:
                await self._write_all_blocks(values, infos)
            finally:
                self.idle.set()

        async def _write_all_blocks(self, values, infos):
            loop = asyncio.get_running_loop()
            slots = asyncio.Semaphore(self._window)
            running: set[asyncio.Task] = set()
            failed: list[BaseException] = []

            async def one(t, leaf: StreamLeaf, lead, r0, r1):
                try:
                    data = await loop.run_in_executor(pool, leaf.read, lead, r0, r1)
                    index = lead + (slice(r0, r1),) if leaf.ndim >= 2 else ()
                    await t[index].write(np.ascontiguousarray(data, dtype=leaf.dtype),
                                         can_reference_source_data_indefinitely=True)
                    if self._on_block is not None:
                        self._on_block(leaf, lead, data.nbytes)
                finally:
                    slots.release()

            with concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="v4jax-read") as pool:
                try:
                    for leaf, info in zip(values, infos):
                        t = await self._open(leaf, info)
                        for lead, r0, r1 in blocks(leaf.shape, leaf.rows):
                            await slots.acquire()
                            if failed:
                                raise failed[0]
                            if self.cancelled.is_set():
                                raise RuntimeError("conversion cancelled")
                            task = asyncio.ensure_future(one(t, leaf, lead, r0, r1))
                            running.add(task)
                            task.add_done_callback(lambda tk: (running.discard(tk), tk.cancelled() or (
                                tk.exception() is not None and failed.append(tk.exception()))))
                    if running:
                        await asyncio.gather(*list(running))
                    if failed:
                        raise failed[0]
                except BaseException:
                    for task in list(running):
                        task.cancel()
                    await asyncio.gather(*list(running), return_exceptions=True)
                    raise

    return StreamingHandler


def _process_index(use_ocdbt: bool):
    from orbax.checkpoint._src.serialization import ocdbt_utils  # noqa: PLC0415

    return ocdbt_utils.get_process_index_for_subdir(use_ocdbt)


def save_streaming(directory: str | Path, tree, *, compression: bool = False, workers: int = 2, window: int = 4,
                   on_block: Callable | None = None) -> None:
    """Save ``tree`` (nested dicts/lists of StreamLeaf) as an Orbax PyTree checkpoint at ``directory``
    (which must not exist), streaming every leaf. ``compression``: zstd chunks (Orbax's default).
    ``on_block(leaf, lead, nbytes)`` is called after each block is written."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    handler = _streaming_handler_class()(workers, window, on_block)
    registry = ocp.type_handlers.create_type_handler_registry((StreamLeaf, handler))
    # Orbax warns that no jax.Array handler is registered, and logs a failed write's traceback from
    # each of its threads before the error reaches us
    with quiet_orbax_logs():
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                             use_compression=compression))
        # Orbax blocks in waits that a signal does not interrupt, so save from a worker thread and wait
        # here in short, interruptible steps: on Ctrl-C the writer is told to stop and is waited for
        # before the caller removes the temporary directory (so nothing is written into it afterwards).
        errors: list[BaseException] = []

        def run():
            try:
                ckptr.save(Path(directory).absolute(), tree)
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(e)

        before = set(threading.enumerate())
        worker = threading.Thread(target=run, name="v4jax-orbax-save", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
            if errors:
                raise _plain_error(errors[0], directory)
        except BaseException:
            handler.cancelled.set()
            worker.join(600)
            handler.idle.wait(600)
            for t in set(threading.enumerate()) - before:  # Orbax's own commit/metadata threads
                if t is not threading.current_thread():
                    with contextlib.suppress(Exception):  # Orbax's threads re-raise their error on join
                        t.join(60)
            # The error's frames hold the TensorStore handles, whose buffered writes are flushed when
            # they are freed: free them now, or they recreate the directory the caller removes.
            for e in errors:
                traceback.clear_frames(e.__traceback__)
            gc.collect()
            raise
        finally:
            ckptr.close()


def _plain_error(e: BaseException, directory) -> BaseException:
    """A TensorStore error without its spec (a few thousand characters of JSON at the end), and one
    from the operating system (disk full, no permission: it carries os_error_code) as that OSError."""
    text = str(e)
    code = re.search(r"\[os_error_code='(\d+)'\]", text)
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(directory))
    if type(e) is ValueError and "[tensorstore_spec=" in text:
        return ValueError(re.sub(r"\s*\[tensorstore_spec='.*'\]", "", text, flags=re.S))
    return e


def stream_leaves(specs, sources: dict, block_bytes: int, mesh: dict[str, int] | None = None, config=None):
    """Tree of StreamLeaf with ``specs``' structure; ``sources[path]`` has ``read`` (a LeafSource).
    A weight that ``specs`` holds as {"codes", "scales"} is read as stored (``read_stored``).

    Chunks are blocks of whole rows of about ``block_bytes``. With ``mesh`` (mesh axis -> size, e.g.
    {"fsdp": 4, "expert": 8}) and the ``config`` (whose declarations give the logical axes), chunks
    are also aligned with each leaf's per-device shard under ``v4jax.parallel``'s default rules:
    every chunk lies inside one device's shard, and a shard is a whole number of chunks, so
    restoring onto that mesh reads only each device's own chunks.
    """
    from v4jax.convert.names import tree_paths  # noqa: PLC0415
    from v4jax.schema import info_at  # noqa: PLC0415

    flat = {}
    for path, spec in tree_paths(specs):
        src, weight = sources.get(path), path
        if src is None:  # a weight kept quantised: specs has {"codes", "scales"} at its path
            src, weight = sources[path[:-1]], path[:-1]
        read = src.read if weight == path else functools.partial(src.read_stored, path[-1])
        dt = np.dtype(spec.dtype)
        shape = tuple(spec.shape)
        if mesh is None or len(shape) < 2:
            flat[path] = StreamLeaf(shape, dt, read, rows_per_block(shape, dt.itemsize, block_bytes))
            continue
        shard = shard_shape(info_at(config, weight).axes, shape, mesh)
        cols = shard[-1]
        # rows per chunk: a divisor of the shard's rows, as large as the block size allows
        budget = max(1, block_bytes // max(1, shape[-1] * dt.itemsize))
        rows = max(d for d in _divisors(shard[-2]) if d <= budget) if budget < shard[-2] else shard[-2]
        flat[path] = StreamLeaf(shape, dt, read, rows, None if cols == shape[-1] else cols)
    return unflatten(specs, flat)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shard_shape(logical_axes: tuple, shape: tuple, mesh: dict[str, int]) -> tuple:
    """Per-device shard shape of a parameter with these logical axes under v4jax.parallel's default
    rules on a mesh of these axis sizes (dimensions the mesh does not divide stay whole, as there)."""
    from v4jax.parallel import MESH_AXES, spec_for  # noqa: PLC0415

    check_mesh(mesh)
    sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    spec = spec_for(logical_axes, shape, sizes)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(dim // int(np.prod([sizes[a] for a in axes])) if axes else dim)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Marker


def write_marker(directory: Path, **info) -> None:
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **info}
    (Path(directory) / MARKER).write_text(json.dumps(data, indent=2) + "\n")


def read_marker(directory: str | Path) -> dict:
    path = Path(directory) / MARKER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a v4jax Orbax checkpoint (no {MARKER}); "
                              "convert one with `python -m v4jax.convert to-orbax`") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path} is corrupt ({e}): {REDO}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object): {REDO}")
    if data.get("format") != FORMAT or not isinstance(data.get("format_version"), int) \
            or data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format {data.get('format')!r} version {data.get('format_version')!r}")
    return data


def is_orbax_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / MARKER).is_file()


# --------------------------------------------------------------------------------------------------
# Reading

REDO = ("the checkpoint is incomplete or corrupt: convert it again (python -m v4jax.convert to-orbax) or save it "
        "again (Model.save)")


@contextlib.contextmanager
def quiet_orbax_logs():
    """Silence Orbax's logging while we read or write: a failed restore logs, through asyncio, one
    traceback per array still in flight (tens of thousands of lines for a large model), a failed
    save one from each of Orbax's threads through absl, before the exception we turn into one
    error line."""
    import logging  # noqa: PLC0415

    import absl.logging  # noqa: PLC0415

    verbosity, asyncio_log = absl.logging.get_verbosity(), logging.getLogger("asyncio")
    level = asyncio_log.level
    absl.logging.set_verbosity(absl.logging.FATAL)
    asyncio_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        asyncio_log.setLevel(level)
        absl.logging.set_verbosity(verbosity)


def _first_cause(e: BaseException) -> tuple[str, str | None]:
    """(the innermost cause of an Orbax/TensorStore error on one line, the leaf it names or None).
    The outer exceptions repeat a TensorStore spec of dozens of lines; the innermost one says what
    went wrong ('Error reading "layers.3.attn.wq_b/0.0" ...: Not enough data')."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = str(e).strip().splitlines() or [type(e).__name__]
    leaf = re.search(r'reading "([^"/]+)/', lines[0])
    return lines[0][:400], leaf and leaf.group(1)


class OrbaxParams:
    """The params of an Orbax checkpoint, leaf by leaf and block by block (TensorStore reads).

    ``leaves``: {tree path: (shape, dtype)}; ``read(path, lead, r0, r1)`` as StreamLeaf.read. Every
    block read is checked: NaN or inf in a float leaf, or (given the ``config``) a ``tid2eid``
    entry that names no expert, is a CheckpointError naming the leaf (``checks.check_values``).
    ``decode``: a weight kept quantised (stored as ``codes`` and ``scales``) is one leaf, read as
    its values (bfloat16 holds them exactly); else its two parts are leaves.
    """

    def __init__(self, directory: str | Path, config=None, decode: bool = False):
        import orbax.checkpoint as ocp  # noqa: PLC0415

        self.directory = Path(directory).absolute()
        self.config = config
        if not (self.directory / "_METADATA").is_file():
            raise CheckpointError(f"{self.directory} is not a complete Orbax checkpoint (no _METADATA): {REDO}")
        try:
            with quiet_orbax_logs():
                meta = ocp.StandardCheckpointer().metadata(self.directory).item_metadata
        except Exception as e:  # noqa: BLE001 (Orbax raises many kinds)
            raise CheckpointError(f"cannot read the Orbax metadata of {self.directory}: {_first_cause(e)[0]}; "
                                  f"{REDO}") from None
        tree = meta.tree if hasattr(meta, "tree") else meta
        self.use_zarr3 = bool(getattr(meta, "use_zarr3", False))
        from v4jax.convert.names import tree_paths  # noqa: PLC0415

        self.leaves, self._names = {}, {}
        for path, m in tree_paths(tree or {}):
            path = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path)
            self.leaves[path] = (tuple(m.shape), np.dtype(m.dtype))
            self._names[path] = m.name
        if not self.leaves:  # Orbax logs a warning and returns nothing when it cannot read the metadata
            raise CheckpointError(f"{self.directory}: no arrays found (_METADATA or the OCDBT index under d/ is "
                                  f"corrupt): {REDO}")
        self.kept = {}  # {weight path: "fp8" | "fp4"} of the weights read decoded
        for path, (shape, dt) in list(self.leaves.items()) if decode else ():
            if path[-1] == "codes" and path[:-1] + ("scales",) in self.leaves:
                fmt = self.kept[path[:-1]] = "fp8" if dt == np.dtype(ml_dtypes.float8_e4m3fn) else "fp4"
                self.leaves[path[:-1]] = (shape[:-1] + (shape[-1] * (2 if fmt == "fp4" else 1),),
                                          np.dtype(ml_dtypes.bfloat16))
                del self.leaves[path], self.leaves[path[:-1] + ("scales",)]
        self._open: dict[tuple, object] = {}  # a few open leaves (blocks are read roughly in order)
        self._lock = threading.Lock()
        self._ctx = ocp.type_handlers.get_ts_context(use_ocdbt=True)

    def _store(self, path):
        with self._lock:
            t = self._open.get(path)
        if t is None:
            import orbax.checkpoint as ocp  # noqa: PLC0415
            import tensorstore as ts  # noqa: PLC0415
            from etils import epath  # noqa: PLC0415

            ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.directory))
            info = ocp.type_handlers.ParamInfo(name=self._names[path], parent_dir=epath.Path(self.directory),
                                               is_ocdbt_checkpoint=ocdbt, use_zarr3=self.use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
            try:
                t = ts.open(ts.Spec(spec), open=True, context=self._ctx).result()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{self.directory}: cannot open leaf {self._names[path]}: {_first_cause(e)[0]}; "
                                      f"{REDO}") from None
            with self._lock:
                if len(self._open) >= 8:
                    self._open.pop(next(iter(self._open)))
                self._open[path] = t
        return t

    def read(self, path: tuple, lead: tuple, r0: int, r1: int) -> np.ndarray:
        fmt = self.kept.get(path)
        if fmt is None:
            values = self._read(path, lead + (slice(r0, r1),) if len(self.leaves[path][0]) >= 2 else ())
        else:
            codes = self._read(path + ("codes",), lead + (slice(r0, r1),))
            if fmt == "fp8":  # the scales of the block rows these rows lie in
                b0 = r0 // FP8_BLOCK
                scales = self._read(path + ("scales",), lead + (slice(b0, -(-r1 // FP8_BLOCK)),))
                values = dequant_fp8(codes, scales, row0=r0 - b0 * FP8_BLOCK)
            else:
                values = dequant_fp4(codes, self._read(path + ("scales",), lead + (slice(r0, r1),)))
        bounds = None if self.config is None else int_range(self.config, path)
        check_values(values, f"{self.directory}: leaf {'.'.join(map(str, path))}", REDO, bounds, lead, r0)
        return values

    def read_stored(self, path: tuple, lead: tuple, part: str, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of a kept weight's ``part`` ("codes", "scales") at ``lead``, as stored; NaN
        codes (FP8) or scales (E8M0 byte 255) raise, naming the leaf."""
        values = self._read(path + (part,), lead + (slice(r0, r1),))
        if stored_nan(values, part, self.kept[path]):
            raise CheckpointError(f"{self.directory}: leaf {'.'.join(map(str, path + (part,)))} holds NaN; {REDO}")
        return values

    def _read(self, path: tuple, index: tuple) -> np.ndarray:
        t = self._store(path)
        try:
            return np.asarray(t[index].read().result())
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.directory}: reading leaf {self._names[path]} failed: {_first_cause(e)[0]}; "
                                  f"{REDO}") from None


class TreeParams:
    """A parameter tree in host memory (e.g. a train.py run's model) behind OrbaxParams's reading
    interface, so a run exports as any Orbax directory does: ``leaves`` {tree path: (shape, dtype)},
    ``read(path, lead, r0, r1)`` (checked like OrbaxParams's blocks)."""

    def __init__(self, tree, where: str):
        from v4jax.convert.names import tree_paths  # noqa: PLC0415

        self.directory = where
        self._arrays = {path: np.asarray(a) for path, a in tree_paths(tree)}
        self.leaves = {path: (a.shape, a.dtype) for path, a in self._arrays.items()}

    def read(self, path: tuple, lead: tuple, r0: int, r1: int) -> np.ndarray:
        a = self._arrays[path]
        values = a[lead + (slice(r0, r1),)] if a.ndim >= 2 else a
        check_values(values, f"{self.directory}: {'.'.join(map(str, path))}", "the run's state is not finite",
                     None, lead, r0)
        return values


def stored_formats(directory: str | Path) -> dict[tuple, str]:
    """{parameter path: "fp8" or "fp4"} of the weights a v4jax Orbax checkpoint keeps quantised
    (``v4jax.quant.BlockScaled``: stored as ``codes`` and ``scales``, the codes E4M3 or packed FP4)."""
    return OrbaxParams(Path(directory).absolute() / PARAMS, decode=True).kept


def restore_params(directory: str | Path, specs, sharding=None):
    """Restore the params tree at ``directory/params`` (a converted directory) as jax Arrays shaped
    and typed like ``specs`` (a param_specs tree; stored dtypes are cast), placed with ``sharding``:
    one Sharding for every leaf, or a tree of them like ``specs`` (e.g. ``v4jax.parallel.
    param_shardings``); default: the first device. Shapes are checked first; all mismatches are
    reported together. A missing, truncated or corrupt file is one CheckpointError naming the leaf
    where Orbax says it; after restoring, every float leaf is checked for NaN and inf and ``tid2eid``
    for expert ids outside the config's, on the devices (one flag per leaf, fetched together)."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    from v4jax.config import ModelConfig  # noqa: PLC0415
    from v4jax.convert.names import tree_paths  # noqa: PLC0415
    from v4jax.convert.source import summarise  # noqa: PLC0415

    params_dir = Path(directory).absolute() / PARAMS
    stored = OrbaxParams(params_dir)
    want = {p: s for p, s in tree_paths(specs)}
    problems = [f"missing tensor: {'.'.join(map(str, p))}" for p in want if p not in stored.leaves]
    problems += [f"unexpected tensor: {'.'.join(map(str, p))}" for p in stored.leaves if p not in want]
    problems += [f"wrong shape: {'.'.join(map(str, p))} is {list(stored.leaves[p][0])}, the config implies "
                 f"{list(s.shape)}" for p, s in want.items() if p in stored.leaves and stored.leaves[p][0] != s.shape]
    if problems:
        raise CheckpointError(summarise(f"{params_dir} does not match its config.json", problems), problems)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), specs)
    else:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, sharding)
    failure = None
    with quiet_orbax_logs():
        try:
            params = ocp.StandardCheckpointer().restore(params_dir, target)
        except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many kinds)
            failure = _first_cause(e)
    if failure is not None:  # raised here, outside the handler, so nothing keeps Orbax's tasks alive
        cause, leaf = failure
        raise CheckpointError(f"{params_dir}: cannot restore {f'leaf {leaf}' if leaf else 'the params'}: {cause}; "
                              f"{REDO}")
    config = ModelConfig.from_json(Path(directory) / "config.json")
    flat = list(tree_paths(params))
    bounds = tuple(int_range(config, p) if np.issubdtype(np.dtype(x.dtype), np.integer) else None for p, x in flat)
    flags = jax.device_get(_bad_leaves()([x for _, x in flat], bounds))
    bad = [f"{'.'.join(map(str, p))} ({'NaN or inf' if b is None else f'expert ids outside [{b[0]}, {b[1]})'})"
           for (p, _), b, flag in zip(flat, bounds, flags) if flag]
    if bad:
        raise CheckpointError(f"{params_dir}: bad values in {len(bad)} leaves: {', '.join(bad[:20])}"
                              f"{' ...' if len(bad) > 20 else ''}; {REDO}")
    return params


@functools.lru_cache(maxsize=1)
def _bad_leaves():
    """A jitted function: leaves, bounds -> one bool per leaf, True where a float leaf holds NaN or
    inf or an integer leaf a value outside its ``bounds`` [lo, hi) (None: unchecked)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    def bad(leaves: list, bounds: tuple) -> list:
        out = []
        for x, b in zip(leaves, bounds):
            if jnp.issubdtype(x.dtype, jnp.integer):
                out.append(jnp.zeros((), bool) if b is None else jnp.any((x < b[0]) | (x >= b[1])))
            else:  # 1-byte floats (FP8 codes, E8M0 scales) widened: not every op takes them
                x = x.astype(jnp.float32) if x.dtype.itemsize == 1 else x
                out.append(jnp.logical_not(jnp.all(jnp.isfinite(x))))
        return out

    return jax.jit(bad, static_argnums=1)
