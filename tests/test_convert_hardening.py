"""Conversion hardening: no data loss, no silent wrong result, one clear line for every bad input.

Each test names the fault it holds: an output path that would destroy the source, two runs writing
one output, corrupt values (NaN/inf weights and scales, expert ids out of range) in safetensors and
Orbax inputs, bad arguments, truncated or corrupt Orbax directories, index entries that leave the
checkpoint directory, and a full or read-only disk. The source checkpoint (the release's layout,
FP8 and FP4 tensors included) and its Orbax conversion are written once for the module.
"""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import v4jax
from tests.test_convert_errors import CONFIG, FP4, FP8, _nothing_left, _run, _tensors, _write
from v4jax.convert import orbax_io, orbax_to_safetensors, quant, safetensors_io, safetensors_to_orbax
from v4jax.convert import to_orbax, to_safetensors
from v4jax.convert.safetensors_io import CheckpointError

WKV = "layers.0.attn.wkv.weight"  # F32 [16, 32]: its Orbax chunk (float32, uncompressed) is stored as is
TID2EID = "layers.0.ffn.gate.tid2eid"


@pytest.fixture(scope="module")
def tensors():
    return _tensors()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tensors):
    directory = tmp_path_factory.mktemp("clean") / "src"
    _write(directory, tensors)
    return directory


@pytest.fixture(scope="module")
def orbax(tmp_path_factory, clean):
    dst = tmp_path_factory.mktemp("orbax") / "orbax"
    to_orbax(clean, dst, dtype="float32", progress=False)
    return dst


def _copy(directory: Path, where: Path) -> Path:
    return Path(shutil.copytree(directory, where / directory.name, symlinks=True))


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# --------------------------------------------------------------------------------------------------
# Case 1: an output that is, contains or lies inside the source


@pytest.mark.parametrize("command", ["to-orbax", "to-safetensors"])
@pytest.mark.parametrize("relation", ["same", "parent", "inside", "symlink"])
def test_dst_overlapping_src_is_refused_before_anything_is_written(command, relation, clean, orbax, tmp_path,
                                                                   capsys):
    src = _copy(clean if command == "to-orbax" else orbax, tmp_path / "home")
    dst = {"same": src, "parent": src.parent, "inside": src / "out", "symlink": tmp_path / "link"}[relation]
    if relation == "symlink":
        dst.symlink_to(src, target_is_directory=True)
    before = _snapshot(tmp_path)
    rc, err = _run(capsys, command, "--src", src, "--dst", dst, "--overwrite")
    assert rc == 2, err
    _one_error_line(err, f"--dst {dst}", f"--src {src}")
    assert _snapshot(tmp_path) == before  # the source whole, nothing added


def test_python_api_refuses_dst_equal_to_src(clean, orbax, tmp_path):
    src = _copy(clean, tmp_path)
    with pytest.raises(ValueError, match="--dst .* is --src"):
        to_orbax(src, src, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="--dst .* contains --src"):
        to_safetensors(orbax, orbax.parent, overwrite=True, progress=False)
    assert (src / "config.json").exists() and (orbax / "v4jax_checkpoint.json").exists()


# --------------------------------------------------------------------------------------------------
# Case 2: two runs writing one new output


def test_output_that_appeared_meanwhile_is_kept(clean, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "out"
    real = safetensors_to_orbax.write_marker

    def other_run_finishes_first(directory, **info):  # the last step before publishing
        dst.mkdir()
        (dst / "theirs.txt").write_text("the other run's output")
        real(directory, **info)

    monkeypatch.setattr(safetensors_to_orbax, "write_marker", other_run_finishes_first)
    rc, err = _run(capsys, "to-orbax", "--src", clean, "--dst", dst)
    assert rc == 2
    _one_error_line(err, str(dst), "appeared")
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("rename", ["renameat2", "mkdir fallback"])
def test_publish_refuses_an_empty_directory_that_appeared(rename, tmp_path, monkeypatch):
    """os.rename of a directory onto an existing empty one succeeds on Linux: the publish step must
    not use it without a check that cannot race."""
    if rename == "mkdir fallback":
        monkeypatch.setattr(orbax_io, "_renameat2", lambda: None, raising=False)
    dst = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared"):
        with orbax_io.atomic_output_dir(dst) as tmp:
            (tmp / "ours.txt").write_text("ours")
            dst.mkdir()
    assert list(dst.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------------------
# Case 6: non-finite weights and scales, expert ids out of range


def _nan_f32(t):
    t[WKV] = t[WKV].copy()
    t[WKV][3, 5] = np.nan


def _inf_bf16(t):
    name = "layers.0.attn.wo_b.weight"
    t[name] = t[name].astype(ml_dtypes.bfloat16)
    t[name][1, 2] = np.inf


def _inf_f16(t):
    t["norm.weight"] = t["norm.weight"].astype(np.float16)
    t["norm.weight"][7] = -np.inf


def _nan_fp8_code(t):
    t[FP8] = t[FP8].copy()
    t[FP8].view(np.uint8)[2, 3] = 0x7F  # e4m3fn NaN


def _nan_e8m0(name):
    def edit(t):
        t[name] = t[name].copy()
        t[name].view(np.uint8)[0, 0] = 0xFF  # E8M0 NaN
    return edit


def _inf_f32_scale(t):
    t[FP8[:-7] + ".scale"] = quant.scale_values(t[FP8[:-7] + ".scale"]).copy()
    t[FP8[:-7] + ".scale"][0, 0] = np.inf


def _tid2eid(value):
    def edit(t):
        t[TID2EID] = t[TID2EID].copy()
        t[TID2EID][4, 1] = value
    return edit


BAD_VALUES = {  # id: (edit, the tensor the error must name, the position it must give)
    "F32 NaN": (_nan_f32, WKV, "[3, 5]"),
    "BF16 inf": (_inf_bf16, "layers.0.attn.wo_b.weight", "[1, 2]"),
    "F16 -inf": (_inf_f16, "norm.weight", "[7]"),
    "FP8 NaN code": (_nan_fp8_code, FP8, "[2, 3]"),
    "FP8 E8M0 NaN scale": (_nan_e8m0(FP8[:-7] + ".scale"), FP8[:-7] + ".scale", "[0, 0]"),
    "FP4 E8M0 NaN scale": (_nan_e8m0(FP4[:-7] + ".scale"), FP4[:-7] + ".scale", "[0, 0]"),
    "FP8 F32 inf scale": (_inf_f32_scale, FP8[:-7] + ".scale", "[0, 0]"),
    "tid2eid too large": (_tid2eid(CONFIG.n_routed_experts), TID2EID, "[4, 1]"),
    "tid2eid negative": (_tid2eid(-1), TID2EID, "[4, 1]"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_in_safetensors_are_refused_naming_tensor_and_file(case, tensors, tmp_path, capsys):
    edit, name, at = BAD_VALUES[case]
    t = dict(tensors)
    edit(t)
    directory = tmp_path / "bad"
    where = _write(directory, t)
    with pytest.raises(CheckpointError) as e:
        v4jax.from_pretrained(directory, dtype="float32")
    for needle in (repr(name), where[name], at):
        assert needle in str(e.value), (needle, str(e.value))
    if case in ("F32 NaN", "FP4 E8M0 NaN scale"):  # the converter reads through the same LeafSource
        dst = tmp_path / "out"
        rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", dst)
        assert rc == 2
        _one_error_line(err, repr(name), where[name], at)
        _nothing_left(dst)


def _flip_to_nan(orbax_dir: Path, row: np.ndarray, column: int) -> None:
    """Overwrite one float32 of ``row`` where its bytes sit in an Orbax data file with NaN bytes."""
    needle = np.ascontiguousarray(row, np.float32).tobytes()
    for f in (orbax_dir / "params").rglob("d/*"):
        data = f.read_bytes()
        i = data.find(needle)
        if i >= 0:
            f.write_bytes(data[:i + 4 * column] + b"\xff\xff\xff\xff" + data[i + 4 * column + 4:])
            return
    raise AssertionError("the row's bytes are not in any data file")


def test_flipped_bytes_in_an_orbax_chunk_are_refused(orbax, tensors, tmp_path, capsys):
    bad = _copy(orbax, tmp_path)
    _flip_to_nan(bad, tensors[WKV][0], 7)
    with pytest.raises(CheckpointError, match=rf"{bad}/params: bad values in 1 leaves: layers\.0\.attn\.wkv "
                                              r"\(NaN or inf\);"):
        v4jax.from_pretrained(bad, dtype="float32")
    dst = tmp_path / "st"
    rc, err = _run(capsys, "to-safetensors", "--src", bad, "--dst", dst)
    assert rc == 2
    _one_error_line(err, f"{bad}/params: leaf layers.0.attn.wkv", "non-finite", "[0, 7]")
    _nothing_left(dst)


def test_expert_ids_out_of_range_in_orbax_are_refused(orbax, tmp_path, capsys):
    import orbax.checkpoint as ocp

    bad = _copy(orbax, tmp_path)
    with ocp.StandardCheckpointer() as ckpt:  # rewritten by Orbax itself, bypassing the converter
        params = ckpt.restore(bad / "params")
        params["layers"][0]["ffn"]["gate"]["tid2eid"][4, 1] = CONFIG.n_routed_experts
        shutil.rmtree(bad / "params")
        ckpt.save(bad / "params", params)
    with pytest.raises(CheckpointError, match=rf"{bad}/params: bad values in 1 leaves: {TID2EID} \(expert ids "
                                              rf"outside \[0, {CONFIG.n_routed_experts}\)\);"):
        v4jax.from_pretrained(bad, dtype="float32")
    dst = tmp_path / "st"
    rc, err = _run(capsys, "to-safetensors", "--src", bad, "--dst", dst)
    assert rc == 2
    _one_error_line(err, f"leaf {TID2EID}", f"outside [0, {CONFIG.n_routed_experts})", "[4, 1]")
    _nothing_left(dst)


# --------------------------------------------------------------------------------------------------
# Case 10: bad arguments


BAD_ARGS = {
    "to-orbax --window 0": (["to-orbax", "--window", "0"], "--window 0", ">= 1"),
    "to-orbax --workers 0": (["to-orbax", "--workers", "0"], "--workers 0", ">= 1"),
    "to-orbax --block-mb 0": (["to-orbax", "--block-mb", "0"], "--block-mb 0", "> 0"),
    "to-orbax --block-mb -5": (["to-orbax", "--block-mb", "-5"], "--block-mb -5", "> 0"),
    "to-orbax --mesh twice": (["to-orbax", "--mesh", "fsdp=2,fsdp=4"], "--mesh 'fsdp=2,fsdp=4'", "fsdp is given twice"),
    "to-safetensors --window 0": (["to-safetensors", "--window", "0"], "--window 0", ">= 1"),
    "to-safetensors --workers 0": (["to-safetensors", "--workers", "0"], "--workers 0", ">= 1"),
    "to-safetensors --block-mb 0": (["to-safetensors", "--block-mb", "0"], "--block-mb 0", "> 0"),
    "to-safetensors --max-shard-size 0": (["to-safetensors", "--max-shard-size", "0"], "--max-shard-size '0'",
                                          "at least 1 byte"),
}


@pytest.fixture
def no_writing(monkeypatch):
    """Bad arguments must be refused before the output is started; the old code hung from there
    (--window 0), crawled (--block-mb 0) or failed on the way (--workers 0)."""
    def must_not_write(*a, **k):
        raise AssertionError("reached the writer with a bad argument")

    monkeypatch.setattr(safetensors_to_orbax, "atomic_output_dir", must_not_write)
    monkeypatch.setattr(orbax_to_safetensors, "atomic_output_dir", must_not_write)


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments_are_one_error_line(case, clean, orbax, tmp_path, no_writing, capsys):
    args, flag, allowed = BAD_ARGS[case]
    dst = tmp_path / "out"
    rc, err = _run(capsys, *args, "--src", clean if args[0] == "to-orbax" else orbax, "--dst", dst)
    assert rc == 2
    _one_error_line(err, flag, allowed)
    _nothing_left(dst)


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(workers=-1), dict(block_mb=float("nan")),
                                    dict(mesh={"fsdp": 0})])
def test_python_api_refuses_bad_arguments(kwargs, clean, orbax, tmp_path, no_writing):
    flag = "--" + next(iter(kwargs)).replace("_", "-")
    with pytest.raises(ValueError, match=flag):
        to_orbax(clean, tmp_path / "out", progress=False, **kwargs)
    if "mesh" not in kwargs:
        with pytest.raises(ValueError, match=flag):
            to_safetensors(orbax, tmp_path / "out", progress=False, **kwargs)
    _nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Case 11: truncated or corrupt Orbax directories, loaded by from_pretrained


def _data_files(directory):  # the chunks (the OCDBT index is in params/d/)
    return sorted((directory / "params").glob("ocdbt.process_0/d/*"), key=lambda f: f.stat().st_size)


CORRUPTIONS = {
    "chunk deleted": lambda d: _data_files(d)[-1].unlink(),
    "chunk truncated": lambda d: os.truncate(_data_files(d)[-1], _data_files(d)[-1].stat().st_size // 2),
    "every chunk truncated": lambda d: [os.truncate(f, 10) for f in _data_files(d)],
    "OCDBT index truncated": lambda d: [os.truncate(f, 10) for f in (d / "params").glob("d/*")],
    "_METADATA removed": lambda d: (d / "params" / "_METADATA").unlink(),
    "_METADATA garbled": lambda d: (d / "params" / "_METADATA").write_bytes(b"\x00garbage{"),
    "marker not UTF-8": lambda d: (d / "v4jax_checkpoint.json").write_bytes(b"\xff\xfe{"),
    "marker not an object": lambda d: (d / "v4jax_checkpoint.json").write_text("[1]"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_orbax_directory_is_one_checkpoint_error(case, orbax, tmp_path, caplog):
    bad = _copy(orbax, tmp_path)
    CORRUPTIONS[case](bad)
    caplog.set_level(logging.WARNING)
    with pytest.raises(CheckpointError) as e:
        v4jax.from_pretrained(bad, dtype="float32")
    message = str(e.value)
    assert str(bad) in message and "convert it again" in message and "\n" not in message, message
    if "chunk" in case:
        assert "cannot restore leaf " in message, message
    assert not caplog.records, [r.getMessage()[:200] for r in caplog.records[:3]]


# --------------------------------------------------------------------------------------------------
# Case 15: index entries that leave the checkpoint directory, non-string entries, OSError


def _with_index_entry(clean, tmp_path, value):
    directory = _copy(clean, tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["norm.weight"] = value
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("name", ["../" * 40 + "etc/passwd", "/etc/passwd", "../src/model-00001-of-00002.safetensors"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused_unopened(name, clean, tmp_path, monkeypatch):
    directory = _with_index_entry(clean, tmp_path, name)

    def must_not_open(self, path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "__init__", must_not_open)
    with pytest.raises(CheckpointError, match=r"weight_map entry 'norm.weight' names the file .* not inside"):
        v4jax.from_pretrained(directory)


@pytest.mark.parametrize("value", [7, None, ["model-00001-of-00002.safetensors"]])
def test_index_entry_that_is_not_a_file_name(value, clean, tmp_path):
    directory = _with_index_entry(clean, tmp_path, value)
    with pytest.raises(CheckpointError, match=r"weight_map entry 'norm.weight': .* must map the tensor to a file name"):
        v4jax.from_pretrained(directory)


def test_disk_full_during_to_orbax_is_one_error_line(clean, tmp_path, monkeypatch, capsys, caplog):
    """TensorStore reports a full disk as a ValueError carrying the OS error code and its spec (a few
    thousand characters of JSON); raised here from the 20th block, as it is from a chunk's write."""
    from v4jax.convert import source

    real, calls = source.LeafSource.read, []

    def fills_up(self, *a):
        calls.append(a)
        if len(calls) == 20:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "embed/0.0" in OCDBT database at local file '
                             '"/x/": Failed to write 5468 bytes to file 16: No space left on device '
                             "[os_error_code='28'] [tensorstore_spec='{\"driver\":\"zarr\"}']")
        return real(self, *a)

    monkeypatch.setattr(source.LeafSource, "read", fills_up)
    caplog.set_level(logging.WARNING)
    dst = tmp_path / "out"
    rc, err = _run(capsys, "to-orbax", "--src", clean, "--dst", dst)
    assert rc == 2 and len(calls) >= 20
    _one_error_line(err, "No space left on device: ", "nothing was written")
    assert "tensorstore_spec" not in err and not caplog.records, (err, caplog.records[:2])
    _nothing_left(dst)


def test_disk_full_during_to_safetensors_is_one_error_line(orbax, tmp_path, monkeypatch, capsys):
    real, calls = safetensors_io.SafetensorsWriter.write, []

    def fills_up(self, name, data):
        calls.append(name)
        if len(calls) == 30:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full disk fails file.write
        real(self, name, data)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", fills_up)
    dst = tmp_path / "st"
    rc, err = _run(capsys, "to-safetensors", "--src", orbax, "--dst", dst, "--max-shard-size", "50KB")
    assert rc == 2 and len(calls) == 30
    _one_error_line(err, f"No space left on device: writing {dst}; nothing was written")
    _nothing_left(dst)


@pytest.mark.parametrize("command", ["to-orbax", "to-safetensors"])
def test_read_only_destination_is_one_error_line(command, clean, orbax, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse as the kernel would for anyone else
        real = Path.mkdir

        def mkdir(self, *a, **k):
            if self.parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        rc, err = _run(capsys, command, "--src", clean if command == "to-orbax" else orbax, "--dst", parent / "out")
    finally:
        parent.chmod(0o755)
    assert rc == 2
    _one_error_line(err, "Permission denied", str(parent))
    assert list(parent.iterdir()) == []
