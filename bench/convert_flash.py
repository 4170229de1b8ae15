"""Benchmark the checkpoint conversion on a synthetic checkpoint with V4-Flash's real tensor shapes.

Writes a checkpoint in the release's layout and dtypes (FP8 e4m3 matrices with E8M0 128×128 block
scales, packed FP4 experts with E8M0 scales per 32 inputs, BF16 embedding/head/norms/compressors,
F32 mHC/sinks/biases, I64 tid2eid) for ``--layers`` full Flash layers (256 routed experts each; the
first is a hash layer; CSA then HCA, as Flash's layers 2 and 3), then runs, each in a fresh process:

1. ``python -m v4jax.convert to-orbax`` (dequantise to bf16, stream into Orbax);
2. ``python -m v4jax.convert to-safetensors --layout official --quantize fp8+fp4`` (back);

and reports wall time, throughput and peak RSS of each (``getrusage`` of the child), against the
size of the whole model. Spot checks that the round trip kept every sampled value bit for bit.

    python bench/convert_flash.py --workdir /path/with/60GB [--layers 2] [--mtp] [--keep]

Random bytes stand in for weights (NaN codes excluded), so compression ratios are not realistic
(the default Orbax output is uncompressed anyway). The input files are dropped from the page cache
(posix_fadvise) before each step, so reads come from disk, as they would for a fresh download.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4jax.config import ModelConfig  # noqa: E402
from v4jax.convert import quant  # noqa: E402
from v4jax.convert.names import is_routed_expert, official_name, scale_name, tree_paths  # noqa: E402
from v4jax.convert.safetensors_io import Checkpoint, SafetensorsWriter  # noqa: E402

FP8_ENDINGS = {("attn", "wq_a"), ("attn", "wq_b"), ("attn", "wkv"), ("attn", "wo_a"), ("attn", "wo_b"),
               ("indexer", "wq_b"), ("shared_experts", "w1"), ("shared_experts", "w2"), ("shared_experts", "w3"),
               ("mtp", "e_proj"), ("mtp", "h_proj")}
BF16 = np.dtype(ml_dtypes.bfloat16)
PIECE = 64 << 20


def flash_config(layers: int, mtp: bool) -> ModelConfig:
    kinds = ["csa", "hca"] * layers
    return ModelConfig(num_hidden_layers=layers, layer_types=tuple(kinds[:layers]), num_hash_layers=1,
                       num_nextn_predict_layers=1 if mtp else 0)


def checkpoint_entries(config: ModelConfig):
    """[(name, dtype, shape, kind)] in the release's formats, layer by layer."""
    from v4jax.model import param_specs  # noqa: PLC0415

    out = []
    for path, spec in tree_paths(param_specs(config, BF16)):
        if is_routed_expert(path):
            o, i = spec.shape[1:]
            for e in range(spec.shape[0]):
                name = official_name(path, e)
                out += [(name, np.dtype(np.int8), (o, i // 2), "fp4"),
                        (scale_name(name), quant.E8M0, quant.fp4_scale_shape((o, i)), "e8m0")]
        elif np.issubdtype(spec.dtype, np.integer):
            out.append((official_name(path), np.dtype(np.int64), spec.shape, "i64"))
        elif np.dtype(spec.dtype) == np.float32:
            out.append((official_name(path), np.dtype(np.float32), spec.shape, "f32"))
        elif tuple(path[-2:]) in FP8_ENDINGS:
            name = official_name(path)
            out += [(name, quant.E4M3, spec.shape, "fp8"),
                    (scale_name(name), quant.E8M0, quant.fp8_scale_shape(spec.shape), "e8m0")]
        else:
            out.append((official_name(path), BF16, spec.shape, "bf16"))
    return out


def random_piece(rng, kind, n, config):
    if kind in ("fp4", "fp8"):
        b = rng.integers(0, 256, n, dtype=np.uint8)
        if kind == "fp8":
            b[(b & 0x7F) == 0x7F] = 0x38  # no NaN codes
        return b
    if kind == "e8m0":
        return rng.integers(118, 128, n, dtype=np.uint8)
    if kind == "bf16":  # values of magnitude in [2^-8, 1), random sign and mantissa
        sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
        exp = rng.integers(119, 127, n, dtype=np.uint16) << 7
        return sign | exp | rng.integers(0, 128, n, dtype=np.uint16)
    if kind == "f32":
        return rng.standard_normal(n, dtype=np.float32) * 0.1
    if kind == "i64":  # tid2eid: K distinct experts per token
        rows = n // config.num_experts_per_tok
        return np.argsort(rng.random((rows, config.n_routed_experts)), axis=1)[:, :config.num_experts_per_tok].astype(
            np.int64).ravel()
    raise AssertionError(kind)


def write_checkpoint(directory: Path, config: ModelConfig, shard_bytes: int = 4 << 30) -> dict:
    directory.mkdir(parents=True)
    entries = checkpoint_entries(config)
    shards, current, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[2])) * e[1].itemsize
        if current and size + n > shard_bytes and e[3] != "e8m0":
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(directory / fname, [(n, dt, s) for n, dt, s, _ in shard])
        for name, dt, shape, kind in shard:
            count = int(np.prod(shape))
            step = max(1, PIECE // dt.itemsize)
            if kind == "i64":
                step = count
            for start in range(0, count, step):
                w.write(name, random_piece(rng, kind, min(step, count - start), config).view(np.uint8))
            weight_map[name] = fname
            total += count * dt.itemsize
        w.close()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = config.to_release_dict()
    cfg.update(torch_dtype="bfloat16", expert_dtype="fp4",
               quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                    "weight_block_size": [128, 128], "activation_scheme": "dynamic"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    largest = max(int(np.prod(s)) * dt.itemsize for _, dt, s, _ in entries)
    return {"tensors": len(entries), "bytes": total, "shards": len(shards), "largest_tensor_bytes": largest}


def drop_page_cache(directory: Path):
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


_WRAPPER = """
import resource, sys
from v4jax.convert.__main__ import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def run_step(args: list[str]) -> dict:
    """Run one conversion in a fresh process; its own peak RSS (threads included) is reported by the
    process itself (RUSAGE_CHILDREN would give the maximum over all earlier children too)."""
    import psutil  # noqa: PLC0415

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args, "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    samples = []  # (seconds, RSS bytes): shows whether memory plateaus or keeps growing with bytes done
    child = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            samples.append((time.time() - start, child.memory_info().rss))
        except psutil.Error:
            pass
        time.sleep(0.25)
    stdout, stderr = proc.communicate()
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"step failed: {args}\n{proc.stdout}\n{proc.stderr}")
    quarters = [max([r for t, r in samples if q * wall / 4 <= t < (q + 1) * wall / 4] or [0]) for q in range(4)]
    rss_kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"seconds": wall, "peak_rss_bytes": rss_kb * 1024,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_by_quarter_bytes": quarters, "load_average_after": os.getloadavg()[0],
            "stdout": proc.stdout.strip()}


def spot_check(src: Path, back: Path, orbax: Path, config: ModelConfig):
    """Decoded values of sampled tensors: input == Orbax == written-back output, bit for bit."""
    from v4jax.convert.orbax_io import OrbaxParams  # noqa: PLC0415
    from v4jax.convert.source import plan_checkpoint  # noqa: PLC0415

    params = OrbaxParams(orbax / "params")
    checked = 0
    with Checkpoint(src) as a, Checkpoint(back) as b:
        pa = {s.path: s for s in plan_checkpoint(a, config, BF16).sources}
        pb = {s.path: s for s in plan_checkpoint(b, config, BF16).sources}
        paths = [("embed",), ("head",), ("layers", 0, "attn", "wq_b"), ("layers", 0, "attn", "wo_a"),
                 ("layers", 0, "ffn", "gate", "tid2eid"), ("layers", 0, "hc_attn", "fn")]
        if config.num_hidden_layers > config.num_hash_layers:
            paths.append(("layers", config.num_hidden_layers - 1, "ffn", "gate", "bias"))
        for path in paths:
            shape = pa[path].shape
            rows = min(shape[0], 300)
            x = pa[path].read((), 0, rows)
            assert np.array_equal(x.view(np.uint8), pb[path].read((), 0, rows).view(np.uint8)), path
            assert np.array_equal(x.view(np.uint8), params.read(path, (), 0, rows).view(np.uint8)), path
            checked += 1
        for layer in range(config.num_hidden_layers):
            for w in ("w1", "w2", "w3"):
                path = ("layers", layer, "ffn", "experts", w)
                for e in (0, 97, 255):
                    n = pa[path].shape[1]
                    x = pa[path].read((e,), 0, n)
                    assert np.array_equal(x.view(np.uint16), pb[path].read((e,), 0, n).view(np.uint16)), (path, e)
                    assert np.array_equal(x.view(np.uint16), params.read(path, (e,), 0, n).view(np.uint16)), (path, e)
                    checked += 1
    return checked


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="scratch directory (needs about 12 GB per layer)")
    ap.add_argument("--layers", type=int, default=2, help="full Flash layers (256 FP4 experts each); default 2")
    ap.add_argument("--mtp", action="store_true", help="also the MTP block (one more full layer)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    work = Path(args.workdir).absolute()
    src, orbax, back = work / "flash_synthetic", work / "flash_orbax", work / "flash_back"
    for d in (src, orbax, back):
        shutil.rmtree(d, ignore_errors=True)
    config = flash_config(args.layers, args.mtp)
    t0 = time.time()
    info = write_checkpoint(src, config)
    print(f"synthetic checkpoint: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards "
          f"({time.time() - t0:.0f} s to write); largest tensor {info['largest_tensor_bytes'] / 1e9:.2f} GB",
          flush=True)

    drop_page_cache(src)
    a = run_step(["to-orbax", "--src", str(src), "--dst", str(orbax)])
    a["out_bytes"] = dir_bytes(orbax / "params")
    print(f"to-orbax: {a['seconds']:.1f} s, peak RSS {a['peak_rss_bytes'] / 2**30:.2f} GiB (by quarter of the run: "
          f"{', '.join(f'{q / 2**30:.2f}' for q in a['peak_rss_by_quarter_bytes'])}); {a['stdout']}", flush=True)

    drop_page_cache(orbax)
    b = run_step(["to-safetensors", "--src", str(orbax), "--dst", str(back), "--layout", "official",
                  "--quantize", "fp8+fp4"])
    b["out_bytes"] = dir_bytes(back)
    print(f"to-safetensors: {b['seconds']:.1f} s, peak RSS {b['peak_rss_bytes'] / 2**30:.2f} GiB (by quarter: "
          f"{', '.join(f'{q / 2**30:.2f}' for q in b['peak_rss_by_quarter_bytes'])}); {b['stdout']}", flush=True)

    checked = spot_check(src, back, orbax, config)
    marker = json.loads((orbax / "v4jax_checkpoint.json").read_text())
    model_bf16 = marker["nbytes"]
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "layers": args.layers, "mtp": args.mtp, "input": info, "model_bf16_bytes": model_bf16,
        "to_orbax": {**a, "in_GBps": info["bytes"] / a["seconds"] / 1e9, "out_GBps": model_bf16 / a["seconds"] / 1e9},
        "to_safetensors": {**b, "in_GBps": model_bf16 / b["seconds"] / 1e9,
                           "out_GBps": b["out_bytes"] / b["seconds"] / 1e9},
        "spot_checked_tensors": checked,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.keep:
        for d in (src, orbax, back):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
