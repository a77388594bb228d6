"""Latency and throughput of the reference Fashion-MNIST teacher and the two student
architectures, in PyTorch eager and exported to ONNX under onnxruntime, at batch 1 and 256:

    OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \\
        python benchmarks/latency.py [--threads 1] [--budget 20]

All six models are timed in one process, taking turns call by call (evaluate/speed.py), after
warm-up; medians (p50) and p95 of repeated calls. The teacher ÷ student ratios compare models in
the same runtime. The teacher carries its trained weights; the students' timings do not depend on
theirs. Writes benchmarks/results/latency.json and prints the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from softkd.evaluate.speed import OnnxModel, footprint, time_models
from softkd.export import write_onnx
from softkd.models import build_model
from softkd.models.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ("resnet-64", ROOT / "teachers" / "resnet64-fashion-mnist" / "teacher.safetensors")
STUDENTS = ("tinycnn-16", "mlp-128")
SHAPE, CLASSES = (1, 28, 28), 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per model and batch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {TEACHER[0]: load_weights(build_model(TEACHER[0], input_shape=SHAPE, num_classes=CLASSES), TEACHER[1])}
    models.update({name: build_model(name, input_shape=SHAPE, num_classes=CLASSES) for name in STUDENTS})
    timed, exporters = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            path = Path(folder) / f"{name}.onnx"
            exporters[name] = write_onnx(model, path, input_shape=SHAPE)
            timed[f"{name} eager"] = model.eval()
            timed[f"{name} onnxruntime"] = OnnxModel(path, threads=args.threads)
        result = time_models(timed, SHAPE, batch_sizes=(1, 256), budget_s=args.budget, repeats=200)
    sizes = {name: footprint(model) for name, model in models.items()}
    rows = []
    for key, stats in result["models"].items():
        name, runtime = key.rsplit(" ", 1)
        teacher = result["models"][f"{TEACHER[0]} {runtime}"]
        rows.append({"model": name, "runtime": runtime, **sizes[name], **stats,
                     "teacher_ratio": {b: teacher[b]["p50_ms"] / stats[b]["p50_ms"] for b in stats}})
    report = {"device": result["device"], "threads": result["threads"], "torch": result["torch"],
              "onnx_exporters": exporters, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = [f"Measured on {report['device']}, torch {report['torch']}:", "",
             "| model | params | runtime | batch 1 p50 / p95 ms | teacher ÷ model | batch 256 images/s | "
             "teacher ÷ model |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        b1, b256 = r["batch1"], r["batch256"]
        lines.append(f"| {r['model']} | {r['params']:,} | {r['runtime']} | {b1['p50_ms']:.2f} / {b1['p95_ms']:.2f} | "
                     f"{r['teacher_ratio']['batch1']:.1f}× | {b256['throughput_per_s']:,.0f} | "
                     f"{r['teacher_ratio']['batch256']:.1f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
