#!/bin/bash
# Issue 36's decode after the host round trips were removed and mHC's collapses moved into
# v4jax.mhc_kernel, in one device call (docs/benchmarks.md Part 16): the kernels checked against
# XLA, bench-flash-8l at 8K decoding at batch 1 and 32 with the kernels and with XLA's fusions
# (traced; the decode programs dumped, and any other program with a copy.1), then the tree before
# (OLD_TREE, when given: batch 1), then transformers in its own process.
#   OUT=$OUT OLD_TREE=.whl_mt/old bash bench/decode_mhc_gpu.sh
set -u
source bench/device_setup.sh
export PYTHONPATH=$SITE:.
P="--config configs/bench-flash-8l.yaml --contexts 8192 --steps 64 --weights bf16"
SUMMARY="tokens|rror" run kernel 90 python3 bench/mhc_kernel.py --tokens 1,32
if grep -q "tokens  32" "$OUT/kernel.txt"; then
  DECODE=(python3 bench/decode.py --mhc-xla)
else  # the kernels failed: XLA's fusions only, so the rest still runs
  DECODE=(python3 -c "import runpy, sys; import v4jax.mhc as m; m.USE_KERNEL = False; runpy.run_path('bench/decode.py', run_name='__main__')")
fi
# the memory fraction only here: the peer's process imports jax too, which would take the GPU's memory
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" \
  SUMMARY_LINES=10 \
  SUMMARY="tok/s|busy|failed|rror" run decode 280 "${DECODE[@]}" $P --batches 1,32 --profile --json "$OUT/decode.json"
# the decode programs, and every other program holding a copy.1 (Part 16's trace charged one outside them)
(cd /tmp/dump && tar czf "$OUT/dump.tgz" $(ls | grep -E "decode_tokens.*after_optimizations.txt$") \
  $(grep -l "%copy\.1 = " $(ls | grep -E "after_optimizations.txt$") | grep -v decode_tokens | head -20))
if [ -n "${OLD_TREE:-}" ]; then
  (cd "$OLD_TREE" && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 SUMMARY="tok/s|rror" \
    run old 120 python3 bench/decode.py $P --batches 1 --json "$OUT/old.json")
fi
SUMMARY="tok/s|failed|rror" run peer 110 python3 bench/decode.py $P --peer-only --json "$OUT/peer.json"
