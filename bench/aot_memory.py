"""Per-device memory of the training step for a config and mesh, from an ahead-of-time compile.

    python bench/aot_memory.py --config configs/small.yaml --devices 8 --mesh fsdp=8 --batch 8 --seq 2048

Nothing is allocated: parameters, optimizer state and batch are abstract. ``--devices N`` compiles for
N fake CPU devices (the CPU backend's memory analysis); on a GPU/TPU host leave it out to use the
real devices.
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
    args = ap.parse_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from v4jax.config import model_config_from_yaml
    from v4jax.memory import training_memory
    from v4jax.model import param_count
    from v4jax.parallel import ParallelConfig, make_mesh
    from v4jax.trainer import TrainConfig

    sizes = {"data": 1}
    for item in args.mesh.split(","):
        k, v = item.split("=")
        sizes[k] = int(v)
    par = ParallelConfig(**sizes, remat=args.remat, capacity_factor=2.0)
    config = model_config_from_yaml(args.config)
    t = time.perf_counter()
    report = training_memory(config, TrainConfig(dtype=args.dtype), par, make_mesh(par), args.batch, args.seq)
    report.update(config=args.config, params=param_count(config)["total"], compile_s=time.perf_counter() - t,
                  remat=args.remat, dtype=args.dtype)
    print(json.dumps(report, indent=2))
    gib = 2**30
    print(f"per device: arguments {report['argument_bytes_per_device'] / gib:.2f} GiB, temporaries "
          f"{report['temp_bytes_per_device'] / gib:.2f} GiB, peak estimate "
          f"{report['peak_estimate_bytes_per_device'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
