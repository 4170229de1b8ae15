"""Generate text from a checkpoint, streaming it (``v4jax-generate``).

    v4jax-generate --checkpoint DIR --prompt "Once upon a time" [--max-new-tokens 200]
        [--temperature 0.7 --top-p 0.95 --top-k 0 --seed 0] [--chat chat|think|think_max]
        [--tokenizer deepseek|bytes] [--dtype bfloat16] [--quantized] [--fp8-cache] [--speculative mtp]

``--checkpoint``: what ``v4jax.from_pretrained`` loads: safetensors in the release's or the
transformers layout, a v4jax Orbax checkpoint, or a train.py run (its newest checkpoint) or one of
its steps (``RUN/checkpoints/N``). The tokenizer is the model's own where the checkpoint records it
(a run, ``Model.save``), else DeepSeek-V4's. ``--chat MODE`` wraps the prompt as one user
turn in the V4 chat format (``v4jax.chat``); without it the prompt is plain text. The reply is
printed as it is generated (in bursts of ``--stream-every`` tokens: the steps between run on the
device). ``--speculative mtp``: the MTP block drafts a token each step and the main model verifies
it (the same greedy output, the same distribution when sampling); the acceptance rate goes to stderr.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="v4jax-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", choices=("chat", "think", "think_max"), default=None,
                   help="wrap the prompt as a user turn in the V4 chat format with this reasoning mode")
    p.add_argument("--tokenizer", choices=("deepseek", "bytes"), default=None,
                   help="default: the one the checkpoint records (a run's), else deepseek")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default: a run's training dtype, else bfloat16")
    p.add_argument("--quantized", action="store_true",
                   help="keep the checkpoint's FP8/FP4 weights as stored in memory (about a third of bf16's bytes "
                   "for the release; from_pretrained(quantized=True))")
    p.add_argument("--fp8-cache", action="store_true",
                   help="keep the compressed cache's non-RoPE channels in FP8 (as the official inference does)")
    p.add_argument("--speculative", choices=("mtp",), default=None,
                   help="self-speculative decoding: the MTP block drafts, the main model verifies")
    p.add_argument("--stream-every", type=int, default=16, help="tokens generated on the device between prints")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import v4jax  # noqa: PLC0415  (after argparse, so --help is fast)
    from v4jax.chat import encode_chat_tokens  # noqa: PLC0415
    from v4jax.tokenizer import text_prompt  # noqa: PLC0415

    try:
        model = v4jax.from_pretrained(args.checkpoint, dtype=args.dtype, quantized=args.quantized)
        from v4jax.cli.environment import describe  # noqa: PLC0415

        print(describe(model.parallel), file=sys.stderr)
        tok = model.tokenizer(args.tokenizer)
        prompt = (encode_chat_tokens([{"role": "user", "content": args.prompt}], tok, args.chat) if args.chat
                  else text_prompt(tok, args.prompt))
        new: list[int] = []
        shown = ""

        def stream(tokens):
            nonlocal shown
            if tokens[0] is None:
                return
            new.append(tokens[0])
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

        stats: dict = {}
        model.generate([prompt], args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                       on_tokens=stream, fp8_cache=args.fp8_cache, speculative=args.speculative, stats=stats,
                       stream_every=args.stream_every)
        sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
        if args.speculative:
            print(f"speculative (mtp): {stats['accepted']} of {stats['drafted']} drafts kept "
                  f"(acceptance rate {stats['acceptance_rate']:.1%})", file=sys.stderr)
    except (ValueError, OSError, NotImplementedError) as e:  # bad input, unreadable checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
