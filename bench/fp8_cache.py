"""The FP8 compressed cache (``fp8_cache``): bytes per token beside the unquantised cache for the
release's shapes, and how far greedy decoding with it agrees with the unquantised cache's.

    python bench/fp8_cache.py --workdir runs/tiny [--prompts 16 --new 256 --prompt-bytes 64]

Prompts are consecutive pieces of the bundled corpus's held-out text. Agreement: sequences equal
over all ``--new`` tokens, the mean position of the first differing token (``--new`` where none
differs), and the fraction of positions whose tokens are equal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a training run (v4jax.from_run)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt-bytes", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax.numpy as jnp  # noqa: PLC0415

    import v4jax  # noqa: PLC0415
    from v4jax.decode import cache_bytes  # noqa: PLC0415
    from v4jax.trainer import load_run_config  # noqa: PLC0415

    table = {}
    for name in ("v4-flash", "v4-pro"):
        config = load_run_config(f"configs/{name}.yaml").model
        for tokens in (131072, 1048576):
            plain, fp8 = (cache_bytes(config, tokens, dtype=jnp.bfloat16, fp8_entries=f) for f in (False, True))
            table[f"{name} {tokens // 1024}K"] = {"bf16_gib": plain["total"] / 2**30, "fp8_gib": fp8["total"] / 2**30,
                                                  "bf16_growing_b_per_token": plain["growing"] / tokens,
                                                  "fp8_growing_b_per_token": fp8["growing"] / tokens}
    for k, v in table.items():
        print(f"{k}: {v['bf16_gib']:.2f} GiB -> {v['fp8_gib']:.2f} GiB; growing "
              f"{v['bf16_growing_b_per_token']:,.0f} -> {v['fp8_growing_b_per_token']:,.0f} B/token")

    model = v4jax.from_run(args.workdir)
    tok = model.tokenizer()
    text = "".join(p.read_text() for p in sorted(Path("data/shakespeare/heldout").glob("*.txt")))
    ids = tok.encode(text)
    n = args.prompt_bytes
    prompts = [ids[i * n:(i + 1) * n] for i in range(args.prompts)]
    kw = dict(temperature=0.0, stop_tokens=[])
    want = model.generate(prompts, args.new, **kw)
    got = model.generate(prompts, args.new, fp8_cache=True, **kw)
    first = [next((j for j, (a, b) in enumerate(zip(w, g)) if a != b), args.new) for w, g in zip(want, got)]
    same = float(np.mean([np.mean(np.asarray(w) == np.asarray(g)) for w, g in zip(want, got)]))
    report = {"workdir": args.workdir, "dtype": str(model.dtype), "prompts": args.prompts, "new": args.new,
              "identical": sum(f == args.new for f in first), "mean_first_difference": float(np.mean(first)),
              "first_differences": first, "token_agreement": same, "cache": table}
    print(f"greedy, {args.prompts} prompts x {args.new} tokens: {report['identical']} identical; first difference "
          f"at {report['mean_first_difference']:.1f} on average; {same:.1%} of positions equal")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
