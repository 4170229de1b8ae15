"""Evaluate a training checkpoint, as JSON (``python eval.py`` or ``v4jax-eval``).

    python eval.py --workdir runs/tiny [--step N] [--files PATH] [--batches N] [--out FILE]
    python eval.py --workdir runs/tiny --task niah [--lengths 128,256,512] [--depths 0,0.5,1] [--png FILE]

``--task ppl`` (the default): perplexity of the main and MTP heads on the held-out split of the
run's corpus, or on ``--files`` (a .txt/.jsonl/.parquet file, directory or glob).
``--task niah``: needle-in-a-haystack accuracy by context length and needle depth (``v4jax.niah``:
a secret number placed in held-out text, asked at the end, answered by likelihood among
``--candidates`` numbers), with a heat map (``--png``, default ``WORKDIR/niah.png``).
Reads the run's config from its checkpoint: the held-out split is the one the run kept
(``data.heldout_fraction`` of a local corpus, docs/data.md). Both tasks show a progress bar on
stderr (``--no-progress``: none); ppl counts the tokens scored, out of the split's for a whole pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import warnings
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers separated by commas, e.g. 0,0.5,1") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers separated by commas, e.g. 128,256")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer >= 1")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="v4jax-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train.py workdir (with checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--task", choices=("ppl", "niah"), default="ppl")
    p.add_argument("--files", default=None, help="evaluate (ppl) or build haystacks from (niah) these files "
                                                 "instead of the held-out split")
    p.add_argument("--batches", type=_positive, default=None,
                   help="ppl: stop after this many batches (default: one pass)")
    p.add_argument("--lengths", type=_ints, default=(128, 256, 512), help="niah: context lengths in tokens")
    p.add_argument("--depths", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0), help="niah: needle depths in [0, 1]")
    p.add_argument("--samples", type=_positive, default=8, help="niah: examples per length and depth")
    p.add_argument("--candidates", type=int, default=10, help="niah: answers scored per example")
    p.add_argument("--seed", type=int, default=0, help="niah: examples' seed")
    p.add_argument("--png", default=None, help="niah: heat map file (default: WORKDIR/niah.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task == "niah" and not all(0.0 <= d <= 1.0 for d in args.depths):
        return _error(f"--depths {','.join(map(str, args.depths))}: each must lie in [0, 1]")
    if args.task == "niah" and args.candidates < 2:
        return _error(f"--candidates {args.candidates}: at least 2 (the true answer and another)")
    with warnings.catch_warnings():  # e.g. a broken newest checkpoint skipped: one line, not a source line
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        try:
            return _evaluate(args)
        except (ValueError, OSError) as e:  # ConfigError, DataError and CheckpointError are ValueErrors
            return _error(str(e))


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _evaluate(args) -> int:
    import jax.numpy as jnp

    from v4jax.trainer import restore_run

    run = restore_run(args.workdir, args.step)
    if run is None:
        return _error(f"no checkpoint in {args.workdir}/checkpoints: pass a train.py --workdir")
    config, train_cfg, data_cfg, state = run["config"], run["train"], run["data"], run["state"]
    if args.task == "niah" and max(args.lengths) > config.max_position_embeddings:
        return _error(f"--lengths {max(args.lengths)} is longer than the model's max_position_embeddings="
                      f"{config.max_position_embeddings}")
    if args.files:
        data_cfg = dataclasses.replace(data_cfg, path=args.files, split="train", shuffle=False, num_epochs=1,
                                       heldout_fraction=0.0)
    else:
        data_cfg = data_cfg.for_eval()
    examples = niah_examples(data_cfg, args) if args.task == "niah" else None  # refuses a short haystack
    from v4jax.cli.environment import describe

    print(describe(), file=sys.stderr)  # what it runs on: backend, devices, kernel paths, once the checks pass
    dtype = jnp.bfloat16 if train_cfg.dtype == "bfloat16" else jnp.float32
    result = {"workdir": str(args.workdir), "step": int(state["step"]), "data": args.files or "held-out split"}
    if args.task == "ppl":
        result.update(precision=train_cfg.precision, indexer_fp4=train_cfg.indexer_fp4)  # quantised as trained
        result.update(perplexity(config, state["params"], data_cfg, dtype, args.batches, not args.no_progress,
                                 train_cfg.precision, train_cfg.indexer_fp4))
    else:
        result.update(niah(config, state["params"], examples, dtype, args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def perplexity(config, params, data_cfg, dtype, batches, progress=True, precision="bf16",
               indexer_fp4=False) -> dict:
    """Main and MTP head losses over ``batches`` batches (None: one whole pass), with a progress bar
    on stderr of the tokens scored (out of the split's, for a whole pass); quantised as
    ``precision`` and ``indexer_fp4`` (``train.precision``, ``train.indexer_fp4``) have it."""
    import jax.numpy as jnp
    from tqdm import tqdm

    from v4jax.data import make_dataset
    from v4jax.engram import hasher_for
    from v4jax.trainer import evaluate, make_eval_step

    eval_fn = make_eval_step(config, dtype, precision=precision, indexer_fp4=indexer_fp4)
    data = make_dataset(data_cfg, hasher=hasher_for(config))
    # a whole pass scores every token of a document after its first
    total = data.num_tokens - data.num_documents if batches is None else None
    bar = tqdm(total=total, desc="perplexity", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)

    def device_batches():
        for n, b in enumerate(itertools.islice(data, batches), 1):
            bar.set_postfix(batches=n, refresh=False)  # shown by the update
            bar.update(int(b["loss_mask"].sum()))
            yield {k: jnp.asarray(v) for k, v in b.items()}

    with bar:
        heads = evaluate(eval_fn, params, device_batches())
    return {head: {"loss": r["loss"], "perplexity": math.exp(r["loss"]), "tokens": int(r["tokens"])}
            for head, r in heads.items()}


def _niah_config(args):
    from v4jax.niah import NiahConfig

    return NiahConfig(lengths=args.lengths, depths=args.depths, samples=args.samples, candidates=args.candidates,
                      seed=args.seed)


def niah_examples(data_cfg, args) -> list[dict]:
    from v4jax.data import load_documents
    from v4jax.niah import build_examples
    from v4jax.tokenizer import load_tokenizer

    return build_examples(_niah_config(args), load_tokenizer(data_cfg.tokenizer), load_documents(data_cfg))


def niah(config, params, examples, dtype, args) -> dict:
    from v4jax.niah import evaluate_niah, make_score_fn, save_heatmap

    result = evaluate_niah(make_score_fn(params, config, dtype), examples, _niah_config(args),
                           progress=not args.no_progress)
    png = Path(args.png) if args.png else Path(args.workdir) / "niah.png"
    result["heatmap"] = str(save_heatmap(result, png, title=f"{Path(args.workdir).name}: needle in a haystack"))
    return result


if __name__ == "__main__":
    sys.exit(main())
