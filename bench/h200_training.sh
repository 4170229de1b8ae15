#!/usr/bin/env bash
# The training-speed comparison of docs/benchmarks.md in one device call: the PyTorch peer
# (transformers, eager) and then v4jax on the same configs and batches, each in its own process, so
# that every ratio compares runs of the same machine and lease.
#
#   bash bench/h200_training.sh                 # both configs; outputs in $OUT (the device's) or bench/out
#   CONFIGS=flash GRAD_CHECK=1 bash bench/h200_training.sh
#
# CONFIGS: "flash small" (default), or either. GRAD_CHECK=1 first checks the training gradient of
# the GPU kernels against the fp32 XLA path. HLO=1 also writes the compiled steps' HLO (gzip). PACK=1
# leaves one archive, $OUT/h200_training.tgz, instead of the files (the device tool returns 8 files). tokamax and its needs are installed from .whl/ when that
# folder is there (docs/benchmarks.md, "Training throughput on H200", lists the wheels). The whole
# plan takes about 8 minutes on an H200: one device call allows 10.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_setup.sh
. bench/device_setup.sh

declare -A ARGS=([flash]="--config configs/bench-flash-8l.yaml --batch 4 --seq 4096"
                 [small]="--config configs/small.yaml --batch 8 --seq 2048"
                 [tiny]="--config configs/tiny.yaml --batch 2 --seq 128")  # tiny: tries the script (the peer needs CUDA)
CONFIGS=${CONFIGS:-flash small}

if [ "${GRAD_CHECK:-0}" = 1 ]; then
  PYTHONPATH=.:bench:$SITE run grad-check 150 python3 bench/grad_check.py --config configs/bench-flash-8l.yaml \
    --layers 4 --batch 1 --seq 2048 --variants default --json "$OUT/grad-check.json"
fi
for c in $CONFIGS; do
  # shellcheck disable=SC2086  # ARGS holds several words on purpose
  PYTHONPATH=. run "peer-$c" 150 python3 bench/peer_hf.py ${ARGS[$c]} --steps 5 --json "$OUT/peer-$c.json"
done
for c in $CONFIGS; do
  hlo=()
  [ "${HLO:-0}" = 1 ] && hlo=(--hlo-out "$OUT/v4jax-$c-hlo.txt.gz")
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.:bench:$SITE run "v4jax-$c" 200 \
    python3 bench/profile_step.py ${ARGS[$c]} --steps 5 --top 40 --json "$OUT/v4jax-$c.json" "${hlo[@]}"
done
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/h200_training.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/h200_training.tgz "$OUT/"
fi
