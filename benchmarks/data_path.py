"""Epoch time of softkd's distillation loop against the plain-PyTorch reference loop
(examples/kd_plain_torch.py), same settings, measured in the same process, alternating A and B.

Two comparisons on the tinycnn-16 ← resnet-64 Fashion-MNIST recipe's settings:
  loop:       both read the same precomputed teacher logits, so the ratio is softkd's own
              overhead (data path, objective, bookkeeping) on identical work;
  end-to-end: softkd's `run` path (teacher logits computed once, amortised over the recipe's
              15 epochs) against the plain loop running the teacher at every step.

Run with the CPU timing environment docs/benchmarks.md gives:
  OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \
    python benchmarks/data_path.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import softkd
from softkd.data.datasets import build_dataset
from softkd.models.weights import load_weights
from softkd.train.runtime import inference_batch_size

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "teachers" / "resnet64-fashion-mnist" / "teacher.safetensors"
SETTINGS = dict(temperature=4.0, beta=0.9, batch_size=256, lr=2e-3, weight_decay=5e-4, seed=0)
RECIPE_EPOCHS = 15


def _plain_module():
    spec = importlib.util.spec_from_file_location("kd_plain_torch", ROOT / "examples" / "kd_plain_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000, help="transfer-set slice (timing is per sample)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-samples", type=int, default=2_048, help="slice for the online-teacher epoch")
    args = parser.parse_args()

    data = build_dataset("fashion-mnist", val_fraction=0.1, seed=0).train
    x, y = data.x[: args.samples], data.y[: args.samples]
    teacher = softkd.build_model("resnet-64", input_shape=(1, 28, 28), num_classes=10)
    if TEACHER.is_file():
        load_weights(teacher, TEACHER)  # timing does not depend on the weights, but use the real ones
    teacher = softkd.Teacher(teacher)
    torch.manual_seed(0)
    student0 = softkd.build_model("tinycnn-16", input_shape=(1, 28, 28), num_classes=10)
    plain = _plain_module()
    logits = teacher.predict_logits(softkd.build_loader(softkd.ArrayDataset(x, y), batch_size=1024))

    def softkd_epoch():
        softkd.distill(copy.deepcopy(student0), None, softkd.ArrayDataset(x, y), teacher_logits=logits,
                       epochs=1, **SETTINGS)

    def plain_epoch():
        plain.distill_plain(copy.deepcopy(student0), teacher, x, y, teacher_logits=logits, epochs=1, **SETTINGS)

    xs, ys = x[: args.teacher_samples], y[: args.teacher_samples]

    def teacher_pass():  # what softkd does once per run
        teacher.predict_logits(softkd.build_loader(softkd.ArrayDataset(xs, ys), batch_size=inference_batch_size(teacher)))

    def plain_online_epoch():  # the reference loop as written: the teacher at every step
        plain.distill_plain(copy.deepcopy(student0), teacher, xs, ys, epochs=1, **SETTINGS)

    softkd_epoch(), plain_epoch()  # warm-up
    loop = {"softkd": [], "plain": []}
    for _ in range(args.repeats):
        loop["softkd"].append(_timed(softkd_epoch))
        loop["plain"].append(_timed(plain_epoch))
    online = {"teacher_pass": [], "plain_online": []}
    for _ in range(max(1, args.repeats // 2)):
        online["teacher_pass"].append(_timed(teacher_pass))
        online["plain_online"].append(_timed(plain_online_epoch))

    ratios = [a / b for a, b in zip(loop["softkd"], loop["plain"])]
    per_sample = {k: statistics.median(v) / len(x) for k, v in loop.items()}
    teacher_per_sample = statistics.median(online["teacher_pass"]) / len(xs)
    plain_online_per_sample = statistics.median(online["plain_online"]) / len(xs)
    softkd_run_epoch = per_sample["softkd"] + teacher_per_sample / RECIPE_EPOCHS
    result = {
        "samples": len(x), "repeats": args.repeats, "threads": torch.get_num_threads(),
        "loop_ratio_median": statistics.median(ratios), "loop_ratios": ratios,
        "softkd_epoch_s": loop["softkd"], "plain_epoch_s": loop["plain"],
        "teacher_pass_s_per_sample": teacher_per_sample,
        "plain_online_epoch_s_per_sample": plain_online_per_sample,
        "end_to_end_ratio": softkd_run_epoch / plain_online_per_sample,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / "data_path.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"loop (same precomputed logits): softkd / plain epoch time = {result['loop_ratio_median']:.3f} "
          f"(median of {args.repeats}; pairs {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"end to end ({RECIPE_EPOCHS}-epoch recipe, teacher amortised) / plain loop with online teacher: "
          f"{result['end_to_end_ratio']:.3f}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
