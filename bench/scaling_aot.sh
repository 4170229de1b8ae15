#!/usr/bin/env bash
# The rows of docs/scaling.md: the training step compiled ahead of time for each target, nothing
# allocated (bench/aot_memory.py: memory, cost analysis, step-time estimate, collective bytes).
#
#   bash bench/scaling_aot.sh small   # tiny and bench-flash-8l (2 layers) on v5p 2x2x1 and v6e 2x2, with and without tokamax
#   bash bench/scaling_aot.sh tpu     # V4-Flash and V4-Pro on v5p-256 and v6e-256, full remat (10-20 min each on 2 cores)
#   bash bench/scaling_aot.sh context # V4-Flash at 128K and 1M tokens a row on v5p-256, context parallel
#   bash bench/scaling_aot.sh gpu-context  # the same on 64 mock H200s (at most 9 min: three 170 s limits)
#   bash bench/scaling_aot.sh gpu-context-128  # one 1M row on 128 mock H200s
#   bash bench/scaling_aot.sh gpu     # V4-Flash on 8 and 64 mock H200s (on a host with one H200; at most 9 min: 240 + 300 s limits)
#
# TPU sections: any host, no TPU needed; TPU_PY is a Python with jax[tpu]==0.10.2 (libtpu 0.0.42.1):
#   python3.11 -m venv /tmp/venv-tpu && /tmp/venv-tpu/bin/pip install -r requirements-tpu.txt
# and TPU_TK_PY one with tokamax (Python >= 3.12: jax[tpu]==0.11.2, libtpu 0.0.48.1; flax 0.12.8 does not
# import under jax 0.11.2, flax 0.12.12 does):
#   python3.12 -m venv /tmp/venv-tpu-tk && /tmp/venv-tpu-tk/bin/pip install -r requirements-tpu.txt tokamax==0.0.17 flax==0.12.12
# The gpu section runs with python3 (jax[cuda] 0.11.2, tokamax if installed) on a host with one GPU.
# Each run writes OUT/NAME.json (the report) and OUT/NAME.txt (the log); OUT defaults to bench/out.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
TPU_PY=${TPU_PY:-/tmp/venv-tpu/bin/python}
TPU_TK_PY=${TPU_TK_PY:-/tmp/venv-tpu-tk/bin/python}
GPU_PY=${GPU_PY:-python3}

row() {  # row NAME PYTHON TIMEOUT_S ARGS...
  local name=$1 py=$2 limit=$3
  shift 3
  echo "== $name: $py bench/aot_memory.py $*"
  local t0=$SECONDS
  { echo "\$ $py bench/aot_memory.py $*"; date -u '+# %Y-%m-%d %H:%M UTC'
    timeout "$limit" nice -n 19 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" bench/aot_memory.py "$@" --json-out "$OUT/$name.json"
    echo "exit $?, wall $((SECONDS - t0)) s"; } > "$OUT/$name.txt" 2>&1
  tail -n 6 "$OUT/$name.txt"
}

SMALL_TINY="--config configs/tiny.yaml --mesh fsdp=2,expert=2 --batch 8 --seq 256"
# bench-flash-8l's first 2 layers at 8 x 1024: all 8 layers at 8 x 4096 did not compile within 900 s on
# the 2-core VM (bash bench/scaling_aot.sh small8l tries that)
SMALL_8L="--config configs/bench-flash-8l.yaml --layers 2 --mesh fsdp=2,expert=2 --batch 8 --seq 1024"
FLASH="--config configs/v4-flash.yaml --remat full --seq 4096"
PRO="--config configs/v4-pro.yaml --remat full --seq 4096"

case "${1:-}" in
small)
  for topo in v5p:2x2x1 v6e:2x2; do
    t=${topo/:/-}
    row "tiny-$t" "$TPU_PY" 900 $SMALL_TINY --tpu-topology "$topo"
    row "8l2-$t" "$TPU_PY" 900 $SMALL_8L --tpu-topology "$topo"
    row "tk-tiny-$t" "$TPU_TK_PY" 900 $SMALL_TINY --tpu-topology "$topo"
    row "tk-8l2-$t" "$TPU_TK_PY" 900 $SMALL_8L --tpu-topology "$topo"
  done ;;
small8l)
  row 8l-v5p-2x2x1 "$TPU_PY" 1800 --config configs/bench-flash-8l.yaml --mesh fsdp=2,expert=2 --batch 8 --seq 4096 \
    --tpu-topology v5p:2x2x1 ;;
tpu)
  row flash-v5p-256 "$TPU_PY" 1500 $FLASH --tpu-topology v5p:8x8x4 --mesh fsdp=8,expert=16,tensor=2 --batch 128
  row flash-v6e-256 "$TPU_PY" 1500 $FLASH --tpu-topology v6e:16x16 --mesh fsdp=8,expert=16,tensor=2 --batch 128
  row pro-v5p-256 "$TPU_PY" 1500 $PRO --tpu-topology v5p:8x8x4 --mesh fsdp=8,expert=16,tensor=2 --batch 128
  row pro-v6e-256 "$TPU_PY" 1500 $PRO --tpu-topology v6e:16x16 --mesh fsdp=8,expert=16,tensor=2 --batch 128
  # the 2026-11-28 mesh with a tensor axis of 4, and with Muon's Newton-Schulz left to XLA (as then)
  row flash-v5p-256-t4 "$TPU_PY" 1500 $FLASH --tpu-topology v5p:8x8x4 --mesh fsdp=4,expert=16,tensor=4 --batch 64
  row flash-v5p-256-unspread "$TPU_PY" 1500 $FLASH --tpu-topology v5p:8x8x4 --mesh fsdp=8,expert=16,tensor=2 \
    --batch 128 --muon-unspread ;;
context)  # V4-Flash with each sequence split over the context axis (8 rows: 1M tokens a step at 128K, 8M at 1M)
  row flash-128k-v5p-256 "$TPU_PY" 1800 --config configs/v4-flash.yaml --remat full --seq 131072 \
    --tpu-topology v5p:8x8x4 --mesh expert=8,context=16,tensor=2 --batch 8
  row flash-1m-v5p-256 "$TPU_PY" 1800 --config configs/v4-flash.yaml --remat full --seq 1048576 \
    --tpu-topology v5p:8x8x4 --mesh expert=8,context=32 --batch 8
  # one 1M row a step over all 256 chips: the experts folded over the context axis
  row flash-1m-ec-v5p-256 "$TPU_PY" 1800 --config configs/v4-flash.yaml --remat full --seq 1048576 \
    --tpu-topology v5p:8x8x4 --mesh context=128,tensor=2 --batch 1 --expert-over-context ;;
gpu-context)  # the same on 64 mock H200s (at most 9 min)
  row flash-128k-h200x64 "$GPU_PY" 170 --config configs/v4-flash.yaml --remat full --seq 131072 --mock-gpus 64 \
    --mesh expert=4,context=16 --batch 4
  row flash-1m-h200x64 "$GPU_PY" 170 --config configs/v4-flash.yaml --remat full --seq 1048576 --mock-gpus 64 \
    --mesh expert=2,context=32 --batch 2
  row flash-1m-ec-h200x64 "$GPU_PY" 170 --config configs/v4-flash.yaml --remat full --seq 1048576 --mock-gpus 64 \
    --mesh context=64 --batch 1 --expert-over-context ;;
gpu-context-128)  # one 1M row on 128 mock H200s, the experts over the context axis (at most 3 min)
  row flash-1m-ec-h200x128 "$GPU_PY" 170 --config configs/v4-flash.yaml --remat full --seq 1048576 --mock-gpus 128 \
    --mesh context=128 --batch 1 --expert-over-context ;;
gpu)
  row flash-h200x8 "$GPU_PY" 240 $FLASH --mock-gpus 8 --mesh fsdp=2,expert=4 --batch 8
  row flash-h200x64 "$GPU_PY" 300 $FLASH --mock-gpus 64 --mesh fsdp=8,expert=8 --batch 64 ;;
*)
  echo "usage: bash bench/scaling_aot.sh small|small8l|tpu|context|gpu-context|gpu-context-128|gpu" >&2
  exit 2 ;;
esac
