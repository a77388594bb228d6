#!/usr/bin/env bash
# One command for a GPU machine, from the repository root: bf16 vs fp32 and softkd vs the plain loop
# (benchmarks/gpu_engine.py), sized for well under 5 minutes on one H100/H200 (a 290 s timeout
# guards it). Prints ratios and PASS/FAIL per target; writes gpu_engine.json to $OUT, or to
# benchmarks/results/ when OUT is unset. Extra arguments go to the script, e.g.
#   bash benchmarks/gpu_engine.sh --data-dir /data/fashion-mnist      (or --device cpu --smoke)
exec bash "$(dirname "$0")/run_on_gpu.sh" gpu_engine "$@"
