"""Conversion failures: corrupt, truncated and mismatched inputs give clear errors naming the file and
tensor, all mismatches are reported together, and no output (not even a partial one) is left."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import CONFIGS
from v4jax.convert import quant
from v4jax.convert.__main__ import _parser
from v4jax.convert.__main__ import main as cli
from v4jax.convert.names import is_routed_expert, official_name, tree_paths
from v4jax.model import init_params

CONFIG = CONFIGS["a"]  # 4 layers (SWA, CSA, HCA, CSA), two hash layers, MTP block
FP8 = "layers.1.attn.wq_a.weight"
FP4 = "layers.1.ffn.experts.0.w1.weight"


def _tensors():
    out = {}
    for path, v in tree_paths(init_params(CONFIG, seed=3)):
        v = np.asarray(v)
        if is_routed_expert(path):
            out.update({official_name(path, e): v[e] for e in range(v.shape[0])})
        else:
            out[official_name(path)] = v.astype(np.int64) if v.dtype == np.int32 else v
    for name, fn in ((FP8, quant.quant_fp8), (FP4, quant.quant_fp4)):
        q, s = fn(out[name])
        out[name], out[name[:-7] + ".scale"] = q, s
    return out


def _write(directory, tensors, n_shards=2):
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-0000{n_shards}.safetensors": names[i::n_shards] for i in range(n_shards)}
    for file, keys in shards.items():
        save_file({k: np.ascontiguousarray(tensors[k]) for k in keys}, directory / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(CONFIG.to_release_dict()))
    return {k: f for f, keys in shards.items() for k in keys}


def _run(capsys, *args):
    rc = cli([*map(str, args), "--no-progress"])
    return rc, capsys.readouterr().err


def _nothing_left(dst):
    assert not dst.exists()
    left = [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    assert not left, [str(f) for p in left for f in p.rglob("*")]


@pytest.fixture
def src(tmp_path):
    return tmp_path / "src", _write(tmp_path / "src", _tensors())


def test_the_fixture_converts(src, tmp_path, capsys):
    rc, err = _run(capsys, "to-orbax", "--src", src[0], "--dst", tmp_path / "out")
    assert rc == 0, err


def test_truncated_shard_names_file_and_tensor(src, tmp_path, capsys):
    directory, where = src
    shard = directory / where[FP8]
    os.truncate(shard, shard.stat().st_size - 7)
    dst = tmp_path / "out"
    rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", dst)
    assert rc == 2
    assert shard.name in err and "truncated" in err and "tensor '" in err, err
    _nothing_left(dst)


def test_corrupt_header_names_file(src, tmp_path, capsys):
    directory, where = src
    shard = directory / where[FP4]
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{")
    dst = tmp_path / "out"
    rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", dst)
    assert rc == 2 and shard.name in err and "corrupt header" in err, err
    _nothing_left(dst)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def test_corrupt_tensor_entry_names_tensor(src, tmp_path, capsys):
    directory, where = src
    shard = directory / where[FP8]

    def edit(h):
        h[FP8]["shape"] = [h[FP8]["shape"][0], h[FP8]["shape"][1] + 1]  # disagrees with its byte range
    _rewrite_header(shard, edit)
    dst = tmp_path / "out"
    rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", dst)
    assert rc == 2 and shard.name in err and FP8 in err and "corrupt" in err, err
    _nothing_left(dst)


def _shift(name, by):
    def edit(h):
        h[name]["data_offsets"] = [o + by for o in h[name]["data_offsets"]]
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda h: h[FP8].update(shape=[-2, -h[FP8]["shape"][0] * h[FP8]["shape"][1] // 2]), "corrupt header entry"),
    (lambda h: h[FP8].update(dtype=["F32"]), "unsupported dtype"),
    (lambda h: h[FP8].update(data_offsets=[0]), "corrupt header entry"),
    ("overlap", "the tensors overlap or leave a gap"),
    ("trailing", "bytes after its last tensor"),
])
def test_header_entries_must_tile_the_data(src, tmp_path, capsys, edit, message):
    """As the reference safetensors reader requires: whole-number shapes and offsets, and tensors that
    tile the data exactly (no two sharing bytes, no gap, nothing after the last)."""
    directory, where = src
    shard = directory / where[FP8]
    if edit == "overlap":  # the tensor after FP8 in the file now starts inside it
        raw = json.loads(shard.read_bytes()[8:8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]])
        raw.pop("__metadata__", None)
        after = min((e["data_offsets"][0], k) for k, e in raw.items() if e["data_offsets"][0] > 0)[1]
        edit = _shift(after, -1)
    if edit == "trailing":
        with open(shard, "ab") as f:
            f.write(b"\0" * 16)
    else:
        _rewrite_header(shard, edit)
    dst = tmp_path / "out"
    rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", dst)
    assert rc == 2 and shard.name in err and message in err, err
    _nothing_left(dst)


def test_index_naming_a_missing_shard(src, tmp_path, capsys):
    directory, _ = src
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["norm.weight"] = "model-00009-of-00009.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", tmp_path / "out")
    assert rc == 2 and "model-00009-of-00009.safetensors" in err, err
    _nothing_left(tmp_path / "out")


def test_all_mismatches_reported_together(tmp_path, capsys):
    t = _tensors()
    del t["layers.0.attn.wkv.weight"]                                    # missing
    t["layers.0.attn.surprise.weight"] = np.zeros((3, 3), np.float32)    # unexpected
    t["layers.1.attn.wq_b.weight"] = np.zeros((5, 7), np.float32)        # wrong shape
    t["norm.weight"] = t["norm.weight"].astype(np.int32)                 # wrong dtype
    t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].astype(np.float32)  # wrong dtype
    del t[FP8[:-7] + ".scale"]                                           # FP8 weight without scale
    t[FP4[:-7] + ".scale"] = t[FP4[:-7] + ".scale"][:3]                  # FP4 scale of the wrong shape
    t["mtp.0.hc_head_fn"] = quant.quant_fp8(t["mtp.0.hc_head_fn"])[0]    # an fp32-kept tensor quantised
    directory = tmp_path / "bad"
    _write(directory, t)
    dst = tmp_path / "out"
    rc, err = _run(capsys, "to-orbax", "--src", directory, "--dst", dst)
    assert rc == 2
    for needle in ("missing tensor: layers.0.attn.wkv.weight", "unexpected tensor: layers.0.attn.surprise.weight",
                   "wrong shape: layers.1.attn.wq_b.weight", "wrong dtype: norm.weight",
                   "wrong dtype: layers.0.ffn.gate.tid2eid", f"missing scale: {FP8[:-7]}.scale",
                   f"wrong shape: scale {FP4[:-7]}.scale", "wrong dtype: mtp.0.hc_head_fn"):
        assert needle in err, (needle, err)
    _nothing_left(dst)
    # the same through from_pretrained
    import v4jax
    from v4jax.convert.safetensors_io import CheckpointError

    with pytest.raises(CheckpointError) as e:
        v4jax.from_pretrained(directory)
    assert len(e.value.problems) == 8


def test_weight_scale_inv_is_accepted_for_scale(tmp_path):
    """Other FP8 checkpoints name the block scale ``weight_scale_inv``; it reads like ``.scale``."""
    import v4jax

    t = _tensors()
    t[FP8[:-7] + ".weight_scale_inv"] = quant.scale_values(t.pop(FP8[:-7] + ".scale"))  # as F32
    _write(tmp_path / "alias", t)
    _write(tmp_path / "plain", _tensors())
    a = v4jax.from_pretrained(tmp_path / "alias", dtype="float32").params["layers"][1]["attn"]["wq_a"]
    b = v4jax.from_pretrained(tmp_path / "plain", dtype="float32").params["layers"][1]["attn"]["wq_a"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_existing_output_is_kept_unless_overwrite(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = _run(capsys, "to-orbax", "--src", src[0], "--dst", dst)
    assert rc == 2 and "already exists" in err and (dst / "keep.txt").read_text() == "mine"
    rc, err = _run(capsys, "to-orbax", "--src", src[0], "--dst", dst, "--overwrite")
    assert rc == 0 and not (dst / "keep.txt").exists() and (dst / "v4jax_checkpoint.json").exists()


def test_interrupted_to_orbax_leaves_nothing(src, tmp_path, monkeypatch):
    from v4jax.convert import source
    from v4jax.convert.safetensors_to_orbax import to_orbax

    calls = {"n": 0}
    real = source.LeafSource.read

    def failing(self, *a):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk on fire")
        return real(self, *a)

    monkeypatch.setattr(source.LeafSource, "read", failing)
    dst = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        to_orbax(src[0], dst, progress=False)
    assert calls["n"] >= 20
    _nothing_left(dst)


def test_ctrl_c_during_to_orbax_leaves_nothing(src, tmp_path, monkeypatch):
    import signal
    import time

    from v4jax.convert import source
    from v4jax.convert.safetensors_to_orbax import to_orbax

    calls = {"n": 0}
    real = source.LeafSource.read

    def interrupting(self, *a):
        calls["n"] += 1
        if calls["n"] == 20:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C; the main thread waits for this writer thread
            time.sleep(2.0)  # room for a loaded machine's main thread to take the signal
        return real(self, *a)

    monkeypatch.setattr(source.LeafSource, "read", interrupting)
    # Ctrl-C's own handler, whatever an earlier test in this process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    dst = tmp_path / "out"
    try:
        with pytest.raises(KeyboardInterrupt):
            to_orbax(src[0], dst, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(1.0)  # nothing reappears afterwards
    _nothing_left(dst)


def test_leftovers_of_a_killed_run_are_removed(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}"  # as a SIGKILLed run would leave it
    (stale / "params").mkdir(parents=True)
    live = tmp_path / f".out.partial-{os.getppid()}"  # a live process's: kept
    live.mkdir()
    assert _run(capsys, "to-orbax", "--src", src[0], "--dst", dst)[0] == 0
    assert not stale.exists() and live.exists() and (dst / "v4jax_checkpoint.json").exists()


def test_interrupted_or_failed_to_safetensors_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    from v4jax.convert import orbax_io

    orbax = tmp_path / "orbax"
    assert _run(capsys, "to-orbax", "--src", src[0], "--dst", orbax, "--dtype", "float32")[0] == 0
    real = orbax_io.OrbaxParams.read
    calls = {"n": 0}

    def nan_later(self, path, *a):
        calls["n"] += 1
        v = real(self, path, *a)
        return np.full_like(v, np.nan) if path[-1] == "wq_b" and v.dtype != np.int32 else v

    monkeypatch.setattr(orbax_io.OrbaxParams, "read", nan_later)
    dst = tmp_path / "st"
    rc, err = _run(capsys, "to-safetensors", "--src", orbax, "--dst", dst, "--quantize", "fp8+fp4",
                   "--max-shard-size", "20KB")
    assert rc == 2 and "wq_b" in err and "NaN" in err, err
    assert calls["n"] > 5
    _nothing_left(dst)


def test_orbax_with_the_wrong_config(src, tmp_path, capsys):
    orbax = tmp_path / "orbax"
    assert _run(capsys, "to-orbax", "--src", src[0], "--dst", orbax)[0] == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(CONFIG.replace(q_lora_rank=24, n_routed_experts=4).to_release_dict()))
    dst = tmp_path / "st"
    rc, err = _run(capsys, "to-safetensors", "--src", orbax, "--dst", dst, "--config", other)
    assert rc == 2 and "wrong shape: layers.0.attn.wq_a" in err and "wrong shape: layers.3.ffn.experts.w1" in err, err
    _nothing_left(dst)
    import v4jax
    from v4jax.convert.safetensors_io import CheckpointError

    (orbax / "config.json").write_text(other.read_text())
    with pytest.raises(CheckpointError, match="wrong shape: layers.0.attn.wq_a"):
        v4jax.from_pretrained(orbax)


def test_not_an_orbax_directory(src, tmp_path, capsys):
    rc, err = _run(capsys, "to-safetensors", "--src", src[0], "--dst", tmp_path / "st")
    assert rc == 2 and "not a v4jax Orbax checkpoint" in err


def test_help_explains_every_flag():
    parser = _parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"to-orbax", "to-safetensors"}
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
    flags = {o for a in sub.choices["to-safetensors"]._actions for o in a.option_strings}
    assert {"--src", "--dst", "--layout", "--quantize"} <= flags
    assert {"--src", "--dst", "--dtype"} <= {o for a in sub.choices["to-orbax"]._actions for o in a.option_strings}


@pytest.mark.parametrize("command", [[sys.executable, "-m", "v4jax.convert"],
                                     [os.path.join(os.path.dirname(sys.executable), "v4jax-convert")]])
def test_module_and_console_script_start(command):
    if not os.path.exists(command[0]):
        pytest.skip("v4jax is not installed in this environment (no v4jax-convert script)")
    out = subprocess.run(command + ["to-safetensors", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--quantize" in out.stdout and "fp8+fp4" in out.stdout
