#!/usr/bin/env bash
# One command for a GPU machine, from the repository root: student-only vs online-teacher vs cached bf16 epochs
# (benchmarks/gpu_cache.py), sized for well under 5 minutes on one H100/H200 (a 290 s timeout
# guards it). Prints ratios and PASS/FAIL per target; writes gpu_cache.json to $OUT, or to
# benchmarks/results/ when OUT is unset. Extra arguments go to the script, e.g.
#   bash benchmarks/gpu_cache.sh --data-dir /data/fashion-mnist      (or --device cpu --smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3)
# This tree's softkd, not an older installed copy; pip only if a dependency is missing (offline-safe).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import softkd" 2>/dev/null; then
  echo "softkd does not import from src/; trying pip install -e . once" >&2
  timeout 60 "$PY" -m pip install -q --no-build-isolation -e . 2>/dev/null || true
fi
"$PY" -c "import softkd, torch; print(f'softkd {softkd.__version__} ({softkd.__file__}), torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
exec timeout --kill-after=10 290 "$PY" benchmarks/gpu_cache.py --device cuda "$@"
