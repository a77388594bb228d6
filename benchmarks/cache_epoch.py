"""What the soft-label cache buys on CPU: distillation epoch time with cached teacher logits
against training the student alone, with the teacher running at every step beside them.

tinycnn-16 student, resnet-64 teacher (teachers/resnet64-fashion-mnist), Fashion-MNIST, the
recipe's settings (batch 256, AdamW, T = 4, β = 0.9), measured in one process, alternating:
  student-only: softkd.fit with cross-entropy (no teacher at all);
  cached:       softkd.distill reading the teacher's logits from a real soft-label cache
                (the recipes' shared cache when it is there, else one built here for the slice);
  online:       softkd.fit with the SoftTarget objective running the teacher on every batch
                (a smaller slice: it is 8x slower; its time is per sample).
Times are the training loop's own epoch time (the `epoch_s` fit() logs: no evaluation, no
setup); reading the cache into memory once per run is reported separately.

Run with the CPU timing environment docs/benchmarks.md gives:
  OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \
    python benchmarks/cache_epoch.py
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import softkd
from softkd.cache import CacheError, SoftLabelCache, fingerprint, ids_sha256
from softkd.data.datasets import build_dataset
from softkd.methods import SoftTarget
from softkd.models.weights import load_weights
from softkd.train.runtime import inference_batch_size

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "teachers" / "resnet64-fashion-mnist" / "teacher.safetensors"
SHARED_CACHE = ROOT / "runs" / "cache-resnet64-fashion-mnist-train"
SETTINGS = dict(batch_size=256, lr=2e-3, weight_decay=5e-4, seed=0)
KD = dict(temperature=4.0, beta=0.9)


def _epoch_seconds(train) -> float:
    """The loop time of one epoch, from the record fit() logs."""
    records = []
    train(records.append)
    return records[-1]["epoch_s"]


def _cached_logits(teacher, train, n: int) -> tuple[torch.Tensor, str, float]:
    """Logits of the first ``n`` transfer samples from a real cache, the cache's origin and the read time."""
    data = {"name": "fashion-mnist", "path": None, "unlabeled_path": None, "split": "train", "val_fraction": 0.1,
            "seed": 0, "n": len(train), "ids_sha256": ids_sha256(train.ids)}
    expected = fingerprint(teacher=teacher, data=data, dtype="fp16")
    try:
        cache, origin = SoftLabelCache.open(SHARED_CACHE, fingerprint=expected), str(SHARED_CACHE.relative_to(ROOT))
    except CacheError:
        folder = Path(tempfile.mkdtemp(prefix="softkd-cache-epoch-"))
        part = softkd.ArrayDataset(train.x[:n], train.y[:n], ids=train.ids[:n])
        stated = fingerprint(teacher=teacher, data={"n": n, "ids_sha256": ids_sha256(part.ids)}, dtype="fp16")
        cache = SoftLabelCache.build(folder, teacher, part, fingerprint=stated, batch_size=inference_batch_size(teacher))
        origin = f"built here for the slice ({folder})"
    start = time.perf_counter()
    logits = cache.logits(torch.arange(n))
    return logits, origin, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000, help="transfer-set slice (timing is per sample)")
    parser.add_argument("--online-samples", type=int, default=2_048, help="slice for the online-teacher epoch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    train = build_dataset("fashion-mnist", val_fraction=0.1, seed=0).train
    n = min(args.samples, len(train))
    data = softkd.ArrayDataset(train.x[:n], train.y[:n], ids=train.ids[:n])
    online_data = softkd.ArrayDataset(train.x[:args.online_samples], train.y[:args.online_samples])
    teacher = softkd.build_model("resnet-64", input_shape=(1, 28, 28), num_classes=10)
    load_weights(teacher, TEACHER)
    teacher = softkd.Teacher(teacher)
    logits, origin, read_s = _cached_logits(teacher, train, n)
    torch.manual_seed(0)
    student0 = softkd.build_model("tinycnn-16", input_shape=(1, 28, 28), num_classes=10)

    def student_only(log):
        softkd.fit(copy.deepcopy(student0), data, epochs=1, log=log, **SETTINGS)

    def cached(log):
        softkd.distill(copy.deepcopy(student0), None, data, teacher_logits=logits, epochs=1, log=log,
                       **KD, **SETTINGS)

    def online(log):
        softkd.fit(copy.deepcopy(student0), online_data, objective=SoftTarget(teacher=teacher, **KD), epochs=1,
                   log=log, **SETTINGS)

    student_only(None), cached(None)  # warm-up
    times = {"student_only": [], "cached": [], "online": []}
    for i in range(args.repeats):
        for name, train_one in (("student_only", student_only), ("cached", cached))[:: 1 if i % 2 == 0 else -1]:
            times[name].append(_epoch_seconds(train_one))
    for _ in range(max(1, args.repeats // 2)):
        times["online"].append(_epoch_seconds(online))

    ratios = [c / s for c, s in zip(times["cached"], times["student_only"])]
    per_sample = {k: statistics.median(v) / (args.online_samples if k == "online" else n) for k, v in times.items()}
    result = {
        "samples": n, "online_samples": args.online_samples, "repeats": args.repeats, "cache": origin,
        "cache_read_s": read_s, "epoch_s": times,
        "cached_over_student_only_median": statistics.median(ratios), "cached_over_student_only": ratios,
        "online_over_student_only": per_sample["online"] / per_sample["student_only"],
        "images_per_s": {k: 1 / v for k, v in per_sample.items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / "cache_epoch.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ips = result["images_per_s"]
    print("| epoch of tinycnn-16 on Fashion-MNIST | images/s | / student-only |")
    print("|---|---:|---:|")
    print(f"| student only (cross-entropy) | {ips['student_only']:,.0f} | 1.000 |")
    print(f"| distillation, cached teacher logits | {ips['cached']:,.0f} | "
          f"{result['cached_over_student_only_median']:.3f} |")
    print(f"| distillation, teacher at every step | {ips['online']:,.0f} | {result['online_over_student_only']:.3f} |")
    print(f"cached / student-only pairs: {', '.join(f'{r:.3f}' for r in ratios)}; cache read once per run: "
          f"{read_s:.2f} s for {n:,} samples ({origin})")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
