#!/usr/bin/env bash
# MaxText 0.2.5 (Google's JAX trainer, its own DeepSeek-V4 model `deepseek4`) as a second training
# peer on bench-flash-8l's shapes: 8 layers (compress ratios 0,0,4,128,4,128,4,128; 2 hash layers),
# d 2048, 16 heads of 512, q/o LoRA 512, 4 output groups, 16 indexer heads of 128 (top-256), 64
# experts of 512 (top-6, 1 shared), vocab 129280, window 128, hc 4, no MTP; seq 4096, 2 rows per
# micro-batch, 8 micro-batches per optimizer update, bf16 compute, one GPU, synthetic data.
# Run from the repository root on the GPU machine (no network needed):
#   bash bench/maxtext_peer.sh                  # full run, log in $OUT/maxtext-flash.txt
#   STEPS=6 TM=300 OPT=muon bash bench/maxtext_peer.sh
#   TINY=1 PY=/tmp/mt312/bin/python bash bench/maxtext_peer.sh   # CPU smoke test, tiny dims
# Env: OUT (bench/out), PY (python3), TM (timeout s, 240), STEPS (5), OPT (adamw | muon),
#      MOE (ragged: jax.lax.ragged_dot | tokamax: tokamax GMM | dense), REMAT (full),
#      SITE_MT (/tmp/site_mt), LOG (default $OUT/maxtext-flash.txt, $OUT/maxtext-tiny.txt if TINY=1),
#      EXTRA (more key=value overrides, appended last; the last value of a key wins).
# Wheels: .whl_mt/ (MaxText and what it imports beyond the device image) is installed into $SITE_MT;
# when .whl/ holds xprof (tokamax imports it at module level) it and fire/termcolor come from there,
# otherwise a 3-line xprof stub is written (see /work/notes/maxtext.md). Likewise a sympy.isprime
# stub if the image has no sympy (only MaxText's Engram layer calls it; deepseek4 does not).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PY:-python3}
SITE_MT=${SITE_MT:-/tmp/site_mt}
TM=${TM:-240}
STEPS=${STEPS:-5}
OPT=${OPT:-adamw}
MOE=${MOE:-ragged}
REMAT=${REMAT:-full}
TINY=${TINY:-0}
if [ "$TINY" = 1 ]; then LOG=${LOG:-$OUT/maxtext-tiny.txt}; else LOG=${LOG:-$OUT/maxtext-flash.txt}; fi

# ---- install (offline) ----
t0=$SECONDS
if ! ls .whl_mt/maxtext-*.whl >/dev/null 2>&1; then
  echo "maxtext_peer: FAILED: no .whl_mt/maxtext-*.whl in $(pwd) (gather the wheels first, see /work/notes/maxtext.md)"
  exit 2
fi
whls=(.whl_mt/*.whl)
for w in .whl/xprof-*.whl .whl/fire-*.whl .whl/termcolor-*.whl; do [ -f "$w" ] && whls+=("$w"); done
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE_MT" \
  "${whls[@]}" >"$OUT/maxtext-install.txt" 2>&1; then
  echo "maxtext_peer: FAILED: pip could not install the wheels into $SITE_MT:"
  tail -5 "$OUT/maxtext-install.txt"
  exit 2
fi
export PYTHONPATH="$SITE_MT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import xprof.cli.tools.get_kernel_stats_tool" >/dev/null 2>&1; then
  # tokamax/_src/benchmarking.py does `from xprof.cli.tools import get_kernel_stats_tool` at import
  # time and calls it only when profiling a kernel benchmark (never in MaxText training).
  rm -rf "$SITE_MT/xprof" "$SITE_MT"/xprof-*.dist-info
  mkdir -p "$SITE_MT/xprof/cli/tools"
  : >"$SITE_MT/xprof/__init__.py"; : >"$SITE_MT/xprof/cli/__init__.py"; : >"$SITE_MT/xprof/cli/tools/__init__.py"
  printf 'def compute_kernel_stats(*args, **kwargs):\n  raise RuntimeError("xprof stub (maxtext_peer.sh): xprof is not installed")\n' \
    >"$SITE_MT/xprof/cli/tools/get_kernel_stats_tool.py"
  echo "maxtext_peer: note: xprof not available, using the import stub"
fi
if ! "$PY" -c "import sympy" >/dev/null 2>&1; then
  # maxtext/layers/engram.py imports sympy for sympy.isprime (Engram hash table sizes only).
  mkdir -p "$SITE_MT/sympy"
  printf 'def isprime(n):\n  n = int(n)\n  if n < 2:\n    return False\n  i = 2\n  while i * i <= n:\n    if n %% i == 0:\n      return False\n    i += 1\n  return True\n' \
    >"$SITE_MT/sympy/__init__.py"
  echo "maxtext_peer: note: sympy not available, using an isprime-only stub"
fi
if ! "$PY" -c "import maxtext.trainers.pre_train.train" >"$OUT/maxtext-import.txt" 2>&1; then
  echo "maxtext_peer: FAILED: MaxText does not import:"
  grep -E "Error|line [0-9]+, in <module>" "$OUT/maxtext-import.txt" | tail -4
  exit 2
fi
echo "maxtext_peer: installed in $((SECONDS - t0)) s"

# ---- environment ----
export DECOUPLE_GCLOUD=TRUE          # MaxText's own switch: GCS / goodput / Vertex integrations become no-ops
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
BASE_OUT=/tmp/maxtext_out
mkdir -p "$BASE_OUT"

# ---- overrides ----
# Model: deepseek4-284b's settings (norm_topk_prob, routed_scaling_factor 1.5, sqrtsoftplus, swiglu
# limit 10, head_dim 512, rope 64, window 128, hc 4) resized to bench-flash-8l. scan_layers=false so
# every layer takes compress_ratios[i] and hash routing for i < first_num_hash_layers (the scanned
# path hard-codes [128, 4] pairs after the prefix, which would reverse our CSA/HCA order).
COMMON=(
  model_name="${MODEL:-deepseek4-284b}" override_model_config=true
  dataset_type=synthetic
  indexer_sparse_training=true indexer_loss_scaling_factor=0.0
  attention=dot_product
  scan_layers=false remat_policy="$REMAT"
  opt_type="$OPT"
  dtype=bfloat16 weight_dtype=float32
  enable_checkpointing=false save_config_to_gcs=false gcs_metrics=false enable_goodput_recording=false
  skip_jax_distributed_system=true
  base_output_directory="$BASE_OUT" run_name="peer_$(date +%H%M%S)"
  steps="$STEPS" log_period=1 enable_tensorboard=false
  mtp_num_layers=0
)
case "$MOE" in
  ragged) COMMON+=(sparse_matmul=true megablox=false use_tokamax_gmm=false) ;;
  tokamax) COMMON+=(sparse_matmul=true megablox=false use_tokamax_gmm=true) ;;
  dense) COMMON+=(sparse_matmul=false megablox=false) ;;
  *) echo "maxtext_peer: FAILED: MOE must be ragged, tokamax or dense"; exit 2 ;;
esac
if [ "$TINY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SHAPE=(
    hardware=cpu
    base_emb_dim=64 base_num_query_heads=4 base_num_kv_heads=1 head_dim=32 qk_rope_head_dim=16
    q_lora_rank=16 o_groups=4 o_lora_rank=16
    indexer_n_heads=4 indexer_head_dim=32 indexer_topk=4
    num_experts=8 num_experts_per_tok=2 shared_experts=1 base_mlp_dim=32 base_moe_mlp_dim=32
    base_num_decoder_layers=8 first_num_hash_layers=2 "compress_ratios=[0,0,4,128,4,128,4,128]"
    vocab_size=129280 sliding_window_size=32 mhc_expansion_rate=4 sinkhorn_iterations=20
    max_target_length=256 per_device_batch_size=1 gradient_accumulation_steps=2
  )
else
  SHAPE=(
    hardware=gpu
    base_emb_dim=2048 base_num_query_heads=16 base_num_kv_heads=1 head_dim=512 qk_rope_head_dim=64
    q_lora_rank=512 o_groups=4 o_lora_rank=512
    indexer_n_heads=16 indexer_head_dim=128 indexer_topk=256
    num_experts=64 num_experts_per_tok=6 shared_experts=1 base_mlp_dim=512 base_moe_mlp_dim=512
    base_num_decoder_layers=8 first_num_hash_layers=2 "compress_ratios=[0,0,4,128,4,128,4,128]"
    vocab_size=129280 sliding_window_size=128 mhc_expansion_rate=4 sinkhorn_iterations=20
    routed_scaling_factor=1.5 norm_topk_prob=true mlp_activations_limit=10
    rope_max_timescale=10000 compressed_rope_max_timescale=160000
    max_target_length=4096 per_device_batch_size=2 gradient_accumulation_steps=8
  )
fi
# shellcheck disable=SC2206
EXTRA_ARR=(${EXTRA:-})

# ---- run ----
echo "maxtext_peer: $([ "$TINY" = 1 ] && echo "TINY (CPU)" || echo "bench-flash-8l shapes"), $STEPS steps, opt $OPT, moe $MOE, remat $REMAT, timeout $TM s; log $LOG"
t1=$SECONDS
timeout "$TM" "$PY" -m maxtext.trainers.pre_train.train "${COMMON[@]}" "${SHAPE[@]}" "${EXTRA_ARR[@]}" >"$LOG" 2>&1
rc=$?
wall=$((SECONDS - t1))

# ---- summary ----
echo "== maxtext: rc $rc in $wall s"
grep -E "number parameters" "$LOG" | tail -1 | sed 's/^.*\] //'
grep -E "\[train\] Total estimated memory size" "$LOG" | tail -1 | sed 's/^.*\] \[train\]/compiled memory:/'
# compile time: from the state being ready to the AOT-compiled train step's memory report
"$PY" - "$LOG" <<'PYEOF'
import re, sys, datetime
lines = open(sys.argv[1], errors="replace").read().splitlines()
def ts(line):
    m = re.match(r"^[IWE](\d{4}) (\d\d):(\d\d):(\d\d\.\d+)", line)
    return None if not m else int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
start = next((ts(l) for l in lines if "No existing checkpoints found" in l), None)
done = next((ts(l) for l in lines if "[train] Total estimated memory size" in l), None)
if start is not None and done is not None:
    print(f"state init + train-step trace/compile (AOT, before step 0): {done - start:.1f} s (log timestamps)")
steps = []
for l in lines:
    m = re.search(r"completed step: (\d+), seconds: ([\d.]+), TFLOP/s/device: ([\d.]+), Tokens/s/device: ([\d.]+)", l)
    if m:
        loss = re.search(r" loss: ([-\d.naninf]+)", l)
        lm = re.search(r" lm_loss: ([-\d.naninf]+)", l)
        steps.append((int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)),
                      loss.group(1) if loss else "?", lm.group(1) if lm else "?"))
for s in steps:
    print(f"step {s[0]}: {s[1]:.3f} s, {s[2]:.1f} TFLOP/s, {s[3]:.0f} tokens/s, loss {s[4]}, lm_loss {s[5]}")
if len(steps) > 2:
    warm = steps[2:]  # step 0 includes the first dispatch, step 1 can still carry warm-up
    t = sum(s[1] for s in warm) / len(warm)
    tok = sum(s[3] for s in warm) / len(warm)
    print(f"steady (steps {warm[0][0]}..{warm[-1][0]}): {t:.3f} s per optimizer update, {tok:.0f} tokens/s")
elif not steps:
    print("no step completed")
PYEOF
grep -E "Memstats|Using \(GB\)" -A1 "$LOG" | grep -E "GB|Using" | tail -2
if [ "$rc" -ne 0 ]; then
  echo "maxtext_peer: FAILED (rc $rc$([ "$rc" = 124 ] && echo ", timed out after $TM s")). The error:"
  grep -nE "Error|error:|Traceback|CONFIG ERROR|RESOURCE_EXHAUSTED|Out of memory|out of memory" "$LOG" \
    | grep -vE "Config param|DeprecationWarning" | tail -8
  tail -3 "$LOG"
  exit "$rc"
fi
