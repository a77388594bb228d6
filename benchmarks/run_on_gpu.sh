#!/usr/bin/env bash
# Shared by gpu_engine.sh and gpu_cache.sh: run benchmarks/<NAME>.py on the GPU with this tree's
# softkd (not an older installed copy), under a 290 s timeout. Usage: run_on_gpu.sh NAME [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
PY=${PYTHON:-$(command -v python || command -v python3)}
# pip only if a dependency is missing (offline-safe).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import softkd" 2>/dev/null; then
  echo "softkd does not import from src/; trying pip install -e . once" >&2
  timeout 60 "$PY" -m pip install -q --no-build-isolation -e . 2>/dev/null || true
fi
"$PY" -c "import softkd, torch; print(f'softkd {softkd.__version__} ({softkd.__file__}), torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
exec timeout --kill-after=10 290 "$PY" "benchmarks/$name.py" --device cuda "$@"
