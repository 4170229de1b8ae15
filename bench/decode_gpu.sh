#!/bin/bash
# Issue 36's GPU figures in one device call (docs/benchmarks.md Part 12): bench-flash-8l at 8K,
# v4jax's prefill (first and steady), decode at batch 1 and 32 (device loop, host loop, MTP
# speculation) against the bandwidth floor for bf16 and kept FP8/FP4 weights, a traced decode, then
# transformers in its own process.
#   OUT=$OUT bash bench/decode_gpu.sh
set -u
source bench/device_setup.sh
export PYTHONPATH=$SITE:.
SUMMARY_LINES=14 SUMMARY="tok/s|busy|failed|rror" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  run decode 480 python3 bench/decode.py --config configs/bench-flash-8l.yaml --contexts 8192 --batches 1,32 \
  --steps 64 --weights bf16,kept --speculative --host-loop --profile --grouped-decode --json "$OUT/decode.json"
SUMMARY="tok/s|failed|rror" run peer 100 python3 bench/decode.py --config configs/bench-flash-8l.yaml \
  --contexts 8192 --steps 64 --peer-only --json "$OUT/peer.json"
