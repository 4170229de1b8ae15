"""Command line: ``python -m v4jax.convert {to-orbax,to-safetensors} ...`` (also ``v4jax-convert``)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

_DESCRIPTION = """\
Convert DeepSeek-V4 checkpoints between safetensors and v4jax's Orbax format, streaming: host memory
stays bounded (a few blocks of --block-mb MiB) whatever the checkpoint's size, and the output appears
under its name only when complete (it is built under a hidden temporary name next to it).

  to-orbax        safetensors (the release's FP8/FP4 layout, or the layout transformers'
                  save_pretrained writes; detected) -> a v4jax Orbax directory that
                  v4jax.from_pretrained loads
  to-safetensors  a v4jax Orbax directory -> a complete safetensors checkpoint (config.json,
                  model.safetensors.index.json, shards), in either layout, optionally quantised

Every tensor is checked against config.json before anything is written; all problems are listed
together (missing, unexpected, wrongly shaped or typed tensors) and nothing is written.
"""

_EPILOG = """\
examples:
  python -m v4jax.convert to-orbax --src DeepSeek-V4-Flash --dst v4-flash-orbax
  python -m v4jax.convert to-safetensors --src v4-flash-orbax --dst v4-flash-st --layout official --quantize fp8+fp4
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v4jax-convert" if os.path.basename(sys.argv[0]) == "v4jax-convert"
                                else "python -m v4jax.convert", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{to-orbax,to-safetensors}")

    a = sub.add_parser("to-orbax", help="safetensors checkpoint -> v4jax Orbax directory",
                       description="Convert a safetensors checkpoint directory (config.json plus *.safetensors, "
                       "sharded through model.safetensors.index.json or not) to a v4jax Orbax directory. The "
                       "tensor layout (the release's, or transformers') and the config.json style are detected. "
                       "FP8 (128x128 block scales) and packed FP4 (scales per 32 inputs) weights are dequantised "
                       "exactly; E8M0 or F32 scales are accepted; tid2eid becomes int32. A checkpoint without "
                       "mtp.* tensors converts without the MTP block, with a warning.")
    a.add_argument("--src", required=True, help="safetensors checkpoint directory (with config.json), or a "
                   "train.py run (its newest checkpoint) or one of its steps (RUN/checkpoints/N)")
    a.add_argument("--dst", required=True, help="output directory; must not exist unless --overwrite")
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the ordinary weights (default: bfloat16; both hold FP8/FP4 weights exactly). "
                   "mHC, attention sinks, position and router biases stay float32 and tid2eid int32")
    _common(a)
    a.add_argument("--keep-quantized", action="store_true",
                   help="write the FP8/FP4 weights as stored (codes and E8M0 scales) instead of dequantising "
                   "them: about the checkpoint's size on disk and in memory, loaded as such by "
                   "v4jax.from_pretrained (with quantized=True; without it they are decoded on the devices)")
    a.add_argument("--compress", action="store_true",
                   help="zstd-compress the Orbax chunks (smaller, slower; default: uncompressed)")
    a.add_argument("--workers", type=int, default=2, metavar="N",
                   help="threads reading and dequantising blocks (default: 2)")
    a.add_argument("--window", type=int, default=4, metavar="N",
                   help="blocks in flight at once; host memory grows with N x --block-mb (default: 4)")
    a.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="write sharded for a target mesh, e.g. fsdp=4,expert=8,tensor=2 (axes data, fsdp, "
                   "expert, tensor): the Orbax chunks then tile each device's shard under v4jax.parallel's "
                   "default rules, so restoring onto that mesh reads only each device's own chunks. Default: "
                   "chunks of whole rows")

    b = sub.add_parser("to-safetensors", help="v4jax Orbax directory -> safetensors checkpoint",
                       description="Write a v4jax Orbax directory (made by to-orbax) as a complete safetensors "
                       "checkpoint: config.json in the style that matches the layout (the release's "
                       "compress_ratios style for official, transformers' style for hf), "
                       "model.safetensors.index.json and shards model-0000i-of-0000N.safetensors.")
    b.add_argument("--src", required=True, help="v4jax Orbax directory, a train.py run or one of its steps "
                   "(RUN/checkpoints/N) (or, with --config, a bare Orbax params "
                   "checkpoint)")
    b.add_argument("--dst", required=True, help="output directory; must not exist unless --overwrite")
    b.add_argument("--layout", choices=["official", "hf"], default=None,
                   help="tensor names: 'official' = the release's (embed.weight, layers.N.attn.*, mtp.0.*, "
                   "hc_head_*); 'hf' = what transformers' save_pretrained writes (model. prefix, "
                   "model.embed_tokens, model.hc_head.hc_*, attn.norm; no MTP block). Default: the layout "
                   "the Orbax directory was converted from")
    b.add_argument("--quantize", choices=["none", "fp8", "fp8+fp4"], default="none",
                   help="'none': plain weights; 'fp8': the release's FP8 matrices and the routed experts as "
                   "FP8 e4m3 with E8M0 128x128 block scales (the Base checkpoints' layout); 'fp8+fp4': the "
                   "same with routed experts as packed FP4 e2m1, one E8M0 scale per 32 inputs (the released "
                   "instruct checkpoints' layout). Default: none")
    b.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="dtype of the weights that are not quantised (default auto: bfloat16 when quantising, "
                   "as released, else the Orbax directory's dtype). mHC, sinks and biases are always F32, "
                   "tid2eid I64")
    b.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest shard file, e.g. 5GB, 500MB, 2GiB (default: 5GB); a single larger tensor "
                   "gets a shard of its own")
    b.add_argument("--workers", type=int, default=2, metavar="N",
                   help="threads reading and quantising blocks (default: 2)")
    b.add_argument("--window", type=int, default=4, metavar="N",
                   help="blocks in flight at once; host memory grows with N x --block-mb (default: 4)")
    b.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="config.json to use instead of the one in --src (needed for a bare Orbax params "
                   "checkpoint)")
    _common(b)
    return p


def _common(p):
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst (only once the new output is complete)")
    p.add_argument("--block-mb", type=float, default=None, metavar="MB",
                   help="rows are streamed in blocks of about this many MiB (default: 32; to-safetensors counts "
                   "them in fp32); for to-orbax also the size of the Orbax chunks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _mesh(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: use AXIS=SIZE pairs separated by commas, e.g. fsdp=4,expert=8")
        if axis in out:
            raise ValueError(f"--mesh {text!r}: axis {axis} is given twice; give each axis once, e.g. fsdp=4,expert=8")
        out[axis] = int(size)
    return out


def _describe(e: OSError, dst: str) -> str:
    """An OSError on one line: ours as written, the system's as "what: where; nothing was written"."""
    if e.strerror is None:
        return str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or f"writing {dst}"
    return f"{e.strerror}: {where}; nothing was written"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion needs no accelerator
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"

    from v4jax.config import ConfigError  # noqa: PLC0415
    from v4jax.convert.safetensors_io import CheckpointError  # noqa: PLC0415

    block_mb = args.block_mb
    try:
        if args.command == "to-orbax":
            from v4jax.convert.safetensors_to_orbax import to_orbax  # noqa: PLC0415

            s = to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                         progress=not args.no_progress, block_mb=32 if block_mb is None else block_mb,
                         compression=args.compress,
                         workers=args.workers, window=args.window, mesh=_mesh(args.mesh),
                         keep_quantized=args.keep_quantized)
            formats = ", ".join(f"{v} {k}" for k, v in s["formats"].items() if v)
            print(f"wrote {args.dst}: {s['tensors']} tensors from the {s['layout']} layout"
                  + (f" ({formats})" if formats else "") + ", "
                  f"{s['bytes'] / 1e9:.3f} GB in {s['seconds']:.1f} s"
                  + ("" if s["has_mtp"] else "; no MTP block"))
        else:
            from v4jax.convert.orbax_to_safetensors import to_safetensors  # noqa: PLC0415

            s = to_safetensors(args.src, args.dst, layout=args.layout, quantize=args.quantize, dtype=args.dtype,
                               max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                               progress=not args.no_progress, block_mb=32 if block_mb is None else block_mb,
                               config_path=args.config, workers=args.workers, window=args.window)
            print(f"wrote {args.dst}: {s['tensors']} tensors in {s['shards']} shards, {s['bytes'] / 1e9:.3f} GB, "
                  f"{s['layout']} layout, quantize {s['quantize']}, other weights {s['dtype']}")
            if s["quantisation_error"]:  # lossy unless the weights were on the FP8/FP4 grid already
                print("quantisation error (relative RMS of the weights): " + ", ".join(
                    f"{group} {err:.2%}" for group, err in s["quantisation_error"].items())
                    + ("" if any(s["quantisation_error"].values()) else " (the weights were on the grid: exact)"))
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an existing --dst, a read-only or full disk, ...: any partial output is removed
        print(f"error: {_describe(e, args.dst)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
