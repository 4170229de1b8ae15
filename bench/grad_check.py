"""The training gradient on the device against the fp32 XLA path, per group of parameters.

    python3 bench/grad_check.py --config configs/bench-flash-8l.yaml --layers 4 --batch 1 --seq 2048

The CPU tests check each GPU path (tokamax's grouped matmul as its custom VJP, the Pallas kernels in
interpret mode) against a reference; this runs the real kernels. It computes the training loss and
its gradient (``v4jax.trainer.loss_fn``, every loss term) on one random model and batch:

    reference   fp32 compute, jax.lax.ragged_dot MoE, the XLA attention
    variants    bf16 compute with the default backends (``default``), with the XLA MoE
                (``xla-moe``), with the Pallas attention (``pallas``)

and prints, for each variant, the relative error ||g - g_ref|| / ||g_ref|| over all parameters and
over each group (embedding, head, and per layer the attention, mHC and MoE parameters). bf16
compute alone gives errors of a few percent; a kernel or layout bug shows as a group far above
its neighbours.
"""

from __future__ import annotations

import argparse
import collections
import json

import jax
import jax.numpy as jnp
import long_context

import v4jax
from v4jax.config import model_config_from_yaml
from v4jax.parallel import ParallelConfig
from v4jax.params import path_keys
from v4jax.trainer import TrainConfig, loss_fn

VARIANTS = {"default": ("bfloat16", {}), "xla-moe": ("bfloat16", {"moe_backend": "ragged_dot"}),
            "pallas": ("bfloat16", {"attention_kernel": "pallas"})}


def group_of(path) -> str:
    keys = [str(k) for k in path_keys(path)]
    if keys[0] in ("stages", "layers"):
        part = next((k for k in keys if k in ("attn", "ffn", "hc_attn", "hc_ffn")), "norms")
        return f"{keys[0]}[{keys[1]}]{'[' + keys[2] + ']' if keys[0] == 'stages' else ''}.{part}"
    return keys[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench-flash-8l.yaml")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    config = model_config_from_yaml(args.config)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers, layer_types=config.layer_types[: args.layers])
    params = long_context.device_params(v4jax, config, jnp.float32, True)
    batch = jax.device_put(long_context.synthetic_batch(config, args.batch, args.seq))

    def gradient(dtype, parallel):
        cfg = TrainConfig(dtype=dtype)
        fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, config, cfg, 0, parallel)[0], allow_int=True))
        loss, grads = fn(params)
        flat = [(path, g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
                if g.dtype != jax.dtypes.float0]
        return float(loss), flat

    ref_loss, ref = gradient("float32", ParallelConfig(moe_backend="ragged_dot"))
    print(f"{jax.devices()[0].device_kind}: reference loss {ref_loss:.5f}", flush=True)
    rows = {}
    for name in args.variants.split(","):
        dtype, overrides = VARIANTS[name]
        loss, got = gradient(dtype, ParallelConfig(**overrides))
        num, den = collections.Counter(), collections.Counter()
        for (path, g), (_, r) in zip(got, ref, strict=True):
            for key in ("all", group_of(path)):
                num[key] += float(jnp.sum(jnp.square(g.astype(jnp.float32) - r)))
                den[key] += float(jnp.sum(jnp.square(r)))
        rows[name] = {"loss": loss, **{k: (num[k] / den[k]) ** 0.5 if den[k] else 0.0 for k in num}}
        print(json.dumps({name: rows[name]}), flush=True)
    keys = list(rows[next(iter(rows))])
    print(f"\n{'relative error':<34}" + "".join(f"{n:>12}" for n in rows))
    for k in keys:
        print(f"{k:<34}" + "".join(f"{rows[n][k]:12.4g}" for n in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reference_loss": ref_loss, "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
