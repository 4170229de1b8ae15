# Sourced by the one-call device scripts (h200_training.sh, accum_training.sh), from the repository
# root: $OUT made, tokamax and its needs installed from .whl/ into $SITE when that folder is there,
# and run(). SUMMARY (an extended regex) picks the lines of each run's output shown on stdout, the
# last SUMMARY_LINES (default 4) of them.
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
SITE=/tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
    || echo "the wheels in .whl/ did not install: v4jax runs without tokamax (XLA's grouped matmul)"
fi
export PYTHONUNBUFFERED=1
SUMMARY=${SUMMARY:-"tokens/s|compile|error|Error|relative"}

# name, timeout in seconds, command...: the output goes to $OUT/name.txt, a short summary to stdout.
run() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  grep -E "$SUMMARY" "$OUT/$name.txt" | grep -v Warning | tail -"${SUMMARY_LINES:-4}"
}
