"""Does a top-k cache teach as well as a dense one? Student accuracy on Fashion-MNIST with the
teacher's logits from a dense fp16 cache and from a top-3 cache (3 largest logits + the tail's
log-mass, spread evenly over the other 7 classes on reading), same student, seeds and budget.

The mlp-128 recipes' settings (resnet-64 teacher, T = 4, β = 0.9, 15 epochs, batch 256, AdamW
2e-3, weight decay 5e-4, best validation epoch kept), with all labels and with 3 % of them; 3
seeds each. Both caches are real: the dense one is the recipes' shared cache (built here if it is
missing), the top-3 one is built beside it from the same teacher once.

  OMP_NUM_THREADS=1 python benchmarks/cache_topk.py        # ~15 min on one CPU core
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import softkd
from softkd.cache import CacheError, SoftLabelCache, fingerprint, ids_sha256
from softkd.data.datasets import build_dataset, keep_labels
from softkd.evaluate.metrics import classification_metrics, predict
from softkd.models.weights import load_weights
from softkd.train.runtime import inference_batch_size

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "teachers" / "resnet64-fashion-mnist" / "teacher.safetensors"
CACHES = {"dense fp16": (ROOT / "runs" / "cache-resnet64-fashion-mnist-train", None),
          "top-3 fp16": (ROOT / "runs" / "cache-resnet64-fashion-mnist-train-top3", 3)}
BUDGET = dict(epochs=15, batch_size=256, optimizer="adamw", lr=2e-3, weight_decay=5e-4, temperature=4.0, beta=0.9)


def _open_or_build(folder: Path, top_k, teacher, train) -> SoftLabelCache:
    data = {"name": "fashion-mnist", "path": None, "unlabeled_path": None, "split": "train", "val_fraction": 0.1,
            "seed": 0, "n": len(train), "ids_sha256": ids_sha256(train.ids)}
    expected = fingerprint(teacher=teacher, data=data, dtype="fp16", top_k=top_k)
    try:
        return SoftLabelCache.open(folder, fingerprint=expected)
    except CacheError:
        start = time.perf_counter()
        cache = SoftLabelCache.build(folder, teacher, train, fingerprint=expected, top_k=top_k,
                                     batch_size=inference_batch_size(teacher))
        print(f"built {folder.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s")
        return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.03])
    args = parser.parse_args()
    torch.set_num_threads(1)

    splits = build_dataset("fashion-mnist", val_fraction=0.1, seed=0)
    teacher = softkd.build_model("resnet-64", input_shape=(1, 28, 28), num_classes=10)
    load_weights(teacher, TEACHER)
    teacher = softkd.Teacher(teacher)
    positions = torch.arange(len(splits.train))
    logits = {name: _open_or_build(folder, k, teacher, splits.train).logits(positions)
              for name, (folder, k) in CACHES.items()}
    test = softkd.build_loader(splits.test, batch_size=1024)
    accuracy: dict[str, dict[str, list[float]]] = {}
    for fraction in args.fractions:
        transfer = keep_labels(splits.train, fraction, seed=0)
        regime = "all labels" if fraction == 1 else f"{fraction:.0%} labels"
        for name, teacher_logits in logits.items():
            for seed in args.seeds:
                torch.manual_seed(seed)
                student = softkd.build_model("mlp-128", input_shape=(1, 28, 28), num_classes=10)
                softkd.distill(student, None, transfer, teacher_logits=teacher_logits, val_data=splits.val,
                               seed=seed, **BUDGET)
                acc = classification_metrics(*predict(student, test))["accuracy"]
                accuracy.setdefault(regime, {}).setdefault(name, []).append(acc)
                print(f"{regime}, {name}, seed {seed}: {100 * acc:.2f} %", flush=True)

    rows = []
    for regime, by_cache in accuracy.items():
        dense, top = (by_cache[name] for name in CACHES)
        rows.append({"regime": regime, **{name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1
                                                 else None, "runs": v} for name, v in by_cache.items()},
                     "difference_points": 100 * (statistics.mean(top) - statistics.mean(dense))})
    bytes_per_sample = {name: SoftLabelCache.open(folder).info()["bytes_per_sample"] for name, (folder, _) in
                        CACHES.items()}
    result = {"student": "mlp-128", "teacher": "resnet-64", "seeds": args.seeds, "budget": BUDGET,
              "bytes_per_sample": bytes_per_sample, "rows": rows,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"}
    out = ROOT / "benchmarks" / "results" / "cache_topk.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    def cell(stats):
        return f"{100 * stats['mean']:.2f} ± {100 * (stats['std'] or 0):.2f}"

    print(f"| labels | dense fp16 ({bytes_per_sample['dense fp16']} B/sample) | "
          f"top-3 fp16 ({bytes_per_sample['top-3 fp16']} B/sample) | top-3 − dense |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['regime']} | {cell(row['dense fp16'])} | {cell(row['top-3 fp16'])} | "
              f"{row['difference_points']:+.2f} |")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
