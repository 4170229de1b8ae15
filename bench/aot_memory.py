"""Per-device memory of the training step for a config and mesh, from an ahead-of-time compile.

    python bench/aot_memory.py --config configs/small.yaml --devices 8 --mesh fsdp=8 --batch 8 --seq 2048

``--layers N`` keeps the config's first N layers (to show how compile time grows with depth);
``--no-scan`` compiles the unrolled per-layer loop instead of the scanned layers.

Nothing is allocated: parameters, optimizer state and batch are abstract. ``--devices N`` compiles for
N fake CPU devices (the CPU backend's memory analysis); on a GPU/TPU host leave it out to use the
real devices; ``--mock-gpus N`` (on a host with a GPU) compiles for N GPUs of that kind through
jax's mock GPU topology; ``--tpu-topology`` compiles for a TPU slice from any host with libtpu:

    pip install -r requirements-tpu.txt   # in a separate virtual environment: jax[tpu] brings libtpu
    python bench/aot_memory.py --config configs/v4-flash.yaml --tpu-topology v5p:8x8x4 --mesh fsdp=16,expert=16 \
        --batch 256 --seq 4096 --remat full
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--devices", type=int, default=None, help="fake CPU devices to compile for")
    ap.add_argument("--mesh", default="data=-1", help="e.g. fsdp=4,expert=2 (the rest 1; one may be -1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--backend", default="ragged_dot",
                    help="grouped matmul: ragged_dot, or padded (XLA:CPU lowers ragged_dot to a dense per-expert "
                         "product, so on fake CPU devices padded is the realistic one)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers instead of jax.lax.scan")
    ap.add_argument("--mock-gpus", type=int, default=None,
                    help="compile for N GPUs of the first local GPU's kind (jax's mock GPU topology, 1 x N x 1)")
    ap.add_argument("--tpu-topology", default=None,
                    help="compile for a TPU slice that is not here, e.g. v5p:8x8x4 (needs jax[tpu], i.e. libtpu)")
    args = ap.parse_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.mock_gpus:  # N mock hosts of one GPU each; the real GPU is only asked for its kind
        os.environ.update(CUDA_VISIBLE_DEVICES="0", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    if args.mock_gpus:  # through jax.config: jax 0.11.2 ignored the JAX_MOCK_GPU_TOPOLOGY variable
        jax.config.update("jax_mock_gpu_topology", f"1x{args.mock_gpus}x1")
    from v4jax.config import model_config_from_yaml
    from v4jax.memory import training_memory
    from v4jax.model import param_count
    from v4jax.parallel import ParallelConfig, make_mesh
    from v4jax.trainer import TrainConfig

    sizes = {"data": 1}
    for item in args.mesh.split(","):
        k, v = item.split("=")
        sizes[k] = int(v)
    par = ParallelConfig(**sizes, remat=args.remat, capacity_factor=2.0, scan_layers=not args.no_scan,
                         moe_backend=args.backend)
    config = model_config_from_yaml(args.config)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=config.layer_types[:args.layers],
                                num_hash_layers=min(config.num_hash_layers, args.layers))
    t = time.perf_counter()
    devices = None
    if args.tpu_topology:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices
    mesh = make_mesh(par, devices)
    report = training_memory(config, TrainConfig(dtype=args.dtype), par, mesh, args.batch, args.seq)
    report.update(config=args.config, layers=config.num_hidden_layers, scan=par.scan_layers, backend=args.backend,
                  params=param_count(config)["total"], compile_s=time.perf_counter() - t, remat=args.remat,
                  dtype=args.dtype, device_kind=mesh.devices.flat[0].device_kind, jax=jax.__version__)
    print(json.dumps(report, indent=2))
    gib = 2**30
    print(f"per device: arguments {report['argument_bytes_per_device'] / gib:.2f} GiB, temporaries "
          f"{report['temp_bytes_per_device'] / gib:.2f} GiB, peak estimate "
          f"{report['peak_estimate_bytes_per_device'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
