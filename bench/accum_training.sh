#!/usr/bin/env bash
# Issue 32's training comparison in one device call: v4jax with gradient accumulation and the
# PyTorch peer (transformers eager, its own accumulation) at the same tokens per optimizer update,
# on bench-flash-8l (8 x 2 x 4096 = 65,536 tokens) and bench-flash-wide (V4-Flash's layer width,
# 16 x 1 x 4096 = 65,536 tokens). Each run is its own process; outputs go to $OUT (or bench/out).
# tokamax and its needs are installed from .whl/ when that folder is there.
set -uo pipefail
cd "$(dirname "$0")/.."
SUMMARY="tokens_per_s|tokens/s|compile|rror|^optimizer|step wall" SUMMARY_LINES=5
# shellcheck source=bench/device_setup.sh
. bench/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

F="--config configs/bench-flash-8l.yaml --seq 4096"
W="--config configs/bench-flash-wide.yaml --seq 4096"
# shellcheck disable=SC2086
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.:bench:$SITE run v4jax-flash ${T1:-150} \
  python3 bench/profile_step.py $F --batch 16 --accum 8 --steps 2 --top 12 --per-part 6 --json "$OUT/v4jax-flash.json"
# shellcheck disable=SC2086
PYTHONPATH=. run peer-flash ${T2:-80} python3 bench/peer_hf.py $F --batch 2 --accum 8 --steps 2 --json "$OUT/peer-flash.json"
# shellcheck disable=SC2086
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.:bench:$SITE run v4jax-wide ${T3:-140} \
  python3 bench/profile_step.py $W --batch 16 --accum 16 --steps 1 --top 12 --per-part 6 --json "$OUT/v4jax-wide.json"
# shellcheck disable=SC2086
PYTHONPATH=. run peer-wide ${T4:-90} python3 bench/peer_hf.py $W --batch 1 --accum 16 --steps 1 --json "$OUT/peer-wide.json"
