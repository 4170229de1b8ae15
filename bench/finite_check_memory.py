"""What the training step's finiteness check costs in device memory (ahead-of-time compile).

    python bench/finite_check_memory.py --config configs/small.yaml --shapes 1x128,8x2048

A step counts as good only if its new parameters and optimizer state are finite
(``v4jax.trainer.make_train_step``). For each batch shape this compiles the step twice on the local
device, as it is and with the check replaced by a constant True (the step without the check), and
prints XLA's memory analysis of both. Nothing is allocated.

The check is one fused reduction over the new state. Rolling a non-finite state back (a select
between the new and the old state) was measured with this script too: it keeps the old state alive
until the check (docs/benchmarks.md, Part 8).
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
    ap.add_argument("--shapes", default="1x128,8x2048", help="batch x seq pairs, comma separated")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp

    from v4jax import trainer
    from v4jax.config import model_config_from_yaml
    from v4jax.memory import training_memory
    from v4jax.parallel import ParallelConfig, make_mesh

    config = model_config_from_yaml(args.config)
    parallel = ParallelConfig()
    mesh = make_mesh(parallel)
    check = trainer.all_finite
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        for with_check in (True, False):
            trainer.all_finite = check if with_check else (lambda tree: jnp.array(True))
            t = time.perf_counter()
            report = training_memory(config, trainer.TrainConfig(dtype=args.dtype), parallel, mesh, b, s)
            report.update(config=args.config, finite_check=with_check, compile_s=round(time.perf_counter() - t, 1),
                          device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
            print(json.dumps(report), flush=True)
    trainer.all_finite = check


if __name__ == "__main__":
    main()
