#!/usr/bin/env bash
# The payoff matrix (benchmarks/quality.py) on one GPU within one 10-minute call: it runs the
# matrix's missing cells in its order (seed 0 of every student, regime and method first) until
# QUALITY_BUDGET_S (540 s) has passed, then stops the cell it is in and prints the table. Each cell
# is saved as it finishes, to $OUT/quality-gpu.json (benchmarks/results/ when OUT is unset), which
# starts from the committed benchmarks/results/quality-gpu.json: a later call continues the matrix.
# GPU cells have a results file of their own; they are never mixed with the CPU cells of
# quality.json. Fashion-MNIST is read from $SOFTKD_DATA (its four IDX files), then the usual places.
#   SOFTKD_DATA=/data/fashion-mnist bash benchmarks/gpu_quality.sh [--only tinycnn-16 ...]
# (QUALITY_DEVICE=cpu and a tiny --matrix run it without a GPU: tests/test_quality_benchmark.py.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
results=${OUT:-benchmarks/results}/quality-gpu.json
if [ -n "${OUT:-}" ] && [ -f benchmarks/results/quality-gpu.json ] && [ ! -f "$results" ]; then
  cp benchmarks/results/quality-gpu.json "$results"
fi
"$PY" -c "import softkd, torch; print(f'softkd {softkd.__version__} ({softkd.__file__}), torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
status=0
timeout --signal=TERM --kill-after=30 "${QUALITY_BUDGET_S:-540}" "$PY" benchmarks/quality.py run \
  --device "${QUALITY_DEVICE:-cuda}" --results "$results" --out runs/quality-gpu "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_quality.sh: stopped at the ${QUALITY_BUDGET_S:-540} s budget; the cells that finished are in $results"
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi
matrix=()
for ((i = 1; i <= $#; i++)); do  # the table of the same matrix
  if [ "${!i}" = --matrix ]; then j=$((i + 1)); matrix=(--matrix "${!j}"); fi
  if [[ "${!i}" == --matrix=* ]]; then matrix=("${!i}"); fi
done
"$PY" benchmarks/quality.py table --results "$results" "${matrix[@]}"
