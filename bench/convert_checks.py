"""What the converter's value checks (NaN/inf weights and scales, expert ids) cost in time.

    python bench/convert_checks.py [--workdir /tmp/convert-checks] [--repeats 3]

Builds a release-layout checkpoint of a random model (FP8 matrices, FP4 experts, bf16 rest; about
0.2 GB) with v4jax itself, then runs ``to_orbax`` (safetensors -> bf16 Orbax) and ``to_safetensors``
(Orbax -> FP8+FP4 safetensors) and prints, per run, the wall time and the time spent inside
``checks.check_values`` (summed over the reader threads, so an upper bound on what the checks add).
Timing whole runs with and without the checks was tried first: on a 2-core machine the difference
drowned in the runs' own spread (either could come out faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/convert-checks")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import v4jax
    from v4jax.config import ModelConfig
    from v4jax.convert import orbax_io, source, to_orbax, to_safetensors

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    config = ModelConfig(vocab_size=8192, hidden_size=1024, num_hidden_layers=4,
                         layer_types=("swa", "csa", "hca", "csa"),
                         num_attention_heads=8, head_dim=128, qk_rope_head_dim=64, q_lora_rank=256, o_groups=2,
                         o_lora_rank=256, index_n_heads=8, index_head_dim=128, n_routed_experts=16,
                         num_experts_per_tok=2, moe_intermediate_size=1024, num_hash_layers=1)
    v4jax.Model.init(config, seed=0, dtype="bfloat16").save(work / "init")
    src = work / "release"
    to_safetensors(work / "init", src, layout="official", quantize="fp8+fp4", progress=False)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"source: {size / 1e9:.3f} GB of safetensors", flush=True)

    real = source.check_values
    spent = [0.0]
    lock = threading.Lock()

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            with lock:
                spent[0] += time.perf_counter() - t

    source.check_values = orbax_io.check_values = timed
    for _ in range(args.repeats):
        for name, run in (("to-orbax", lambda: to_orbax(src, work / "orbax", overwrite=True, progress=False)),
                          ("to-safetensors", lambda: to_safetensors(work / "orbax", work / "st", overwrite=True,
                                                                    quantize="fp8+fp4", progress=False))):
            spent[0] = 0.0
            t = time.perf_counter()
            run()
            wall = time.perf_counter() - t
            print(f"{name}: {wall:.2f} s, of which {spent[0]:.3f} s in the checks ({100 * spent[0] / wall:.1f}%)",
                  flush=True)
    source.check_values = orbax_io.check_values = real
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
