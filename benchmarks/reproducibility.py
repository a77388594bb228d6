"""Is a softkd run reproducible? Runs one config several times, each in a fresh folder, under the
CPU instruction sets given (ATEN_CPU_CAPABILITY: the kernels torch dispatches to), and compares
every student's test accuracy and weights across the runs.

    OMP_NUM_THREADS=1 python benchmarks/reproducibility.py CONFIG [--capability avx512 avx512 avx2]
        [--out runs/reproducibility] [--results benchmarks/results/reproducibility.json]

Writes, per run, the capability torch reported and each student's accuracy; then, for each pair of
runs, whether every weight file is identical bit for bit and the largest accuracy difference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--capability", nargs="+", default=["avx512", "avx512", "avx2"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproducibility")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "reproducibility.json")
    args = parser.parse_args()
    runs = []
    for i, capability in enumerate(args.capability):
        folder = args.out / f"{i}-{capability}"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run([sys.executable, "-m", "softkd.cli", "run", str(args.config), "--out", str(folder)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        reported = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                  env=env, capture_output=True, text=True, check=True).stdout.strip()
        students = {p.stem: json.loads(p.read_text())["result"]["accuracy"]
                    for p in sorted((folder / "students").glob("*.json"))}
        runs.append({"folder": str(folder), "capability": reported, "accuracy": students})
        print(f"run {i} ({reported}): " + ", ".join(f"{k} {100 * v:.2f}" for k, v in students.items()), flush=True)
    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(runs), 2):
        same = all((Path(a["folder"]) / "students" / f"{name}.safetensors").read_bytes()
                   == (Path(b["folder"]) / "students" / f"{name}.safetensors").read_bytes() for name in a["accuracy"])
        diff = max(abs(a["accuracy"][k] - b["accuracy"][k]) for k in a["accuracy"])
        pairs.append({"runs": [i, j], "capabilities": [a["capability"], b["capability"]],
                      "weights_identical": same, "max_accuracy_difference": diff})
        print(f"runs {i} and {j} ({a['capability']} / {b['capability']}): weights "
              f"{'identical' if same else 'differ'}, largest accuracy difference {100 * diff:.2f} points")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"config": str(args.config), "runs": runs, "pairs": pairs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
