#!/usr/bin/env bash
# Issue 32's second peer in one device call: v4jax on bench-flash-8l at 16 rows x 4096 per optimizer
# update in ACCUM micro-batches (default 8, so 2 x 4096 each, as bench/accum_training.sh), then
# MaxText 0.2.5's DeepSeek-V4 on the same shapes and batch (bench/maxtext_peer.sh; its wheels in
# .whl_mt/). Carry .whl and .whl_mt.
set -uo pipefail
cd "$(dirname "$0")/.."
SUMMARY="tokens_per_s|tokens/s|compile|rror|^optimizer|step wall" SUMMARY_LINES=5
# shellcheck source=bench/device_setup.sh
. bench/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# shellcheck disable=SC2086
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.:bench:$SITE run v4jax-flash ${T1:-170} \
  python3 bench/profile_step.py --config configs/bench-flash-8l.yaml --seq 4096 --batch 16 --accum ${ACCUM:-8} --steps 2 \
  --top 12 --per-part 6 --json "$OUT/v4jax-flash.json"
OUT=$OUT TM=${TM:-400} STEPS=${STEPS:-5} bash bench/maxtext_peer.sh
