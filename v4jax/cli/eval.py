"""Perplexity of a training checkpoint's main and MTP heads, as JSON (``python eval.py`` or ``v4jax-eval``).

    python eval.py --workdir runs/tiny [--step N] [--files PATH] [--batches N] [--out FILE]

Reads the run's config from its checkpoint. By default it evaluates the held-out split of the run's
corpus; ``--files`` (a .txt/.jsonl/.parquet file, directory or glob) evaluates other text instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="v4jax-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train.py workdir (with checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--files", default=None, help="evaluate these files instead of the held-out split")
    p.add_argument("--batches", type=int, default=None, help="stop after this many batches (default: one pass)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from v4jax.checkpoint import Checkpointer, model_config_from_meta, scan_layers_from_meta
    from v4jax.data import DataConfig, make_dataset
    from v4jax.model import param_specs
    from v4jax.trainer import TrainConfig, evaluate, init_state, make_eval_step, make_optimizer

    ckpt = Checkpointer(Path(args.workdir) / "checkpoints", async_save=False)
    meta = ckpt.read_meta(args.step)
    if meta is None:
        print(f"error: no checkpoint in {args.workdir}/checkpoints", file=sys.stderr)
        return 2
    config = model_config_from_meta(meta)
    train_cfg = TrainConfig(**meta["train"])
    data_cfg = DataConfig(**meta["data"])
    if args.files:
        data_cfg = dataclasses.replace(data_cfg, path=args.files, split="train", shuffle=False, num_epochs=1,
                                       heldout_fraction=0.0)
    else:
        data_cfg = data_cfg.for_eval()

    specs = param_specs(config, scan=scan_layers_from_meta(meta))  # in the run's parameter layout
    abstract_state = jax.eval_shape(lambda p: init_state(p, make_optimizer(train_cfg, config)), specs)
    state, _, _ = ckpt.restore(abstract_state, args.step)
    step = int(state["step"])
    ckpt.close()

    eval_fn = make_eval_step(config, jnp.bfloat16 if train_cfg.dtype == "bfloat16" else jnp.float32)
    batches = itertools.islice(make_dataset(data_cfg), args.batches)  # None: one whole pass
    heads = evaluate(eval_fn, state["params"], ({k: jnp.asarray(v) for k, v in b.items()} for b in batches))
    result = {"workdir": str(args.workdir), "step": step, "data": args.files or "held-out split"}
    for head, r in heads.items():
        result[head] = {"loss": r["loss"], "perplexity": math.exp(r["loss"]), "tokens": int(r["tokens"])}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
