"""What a live teacher costs: seconds per training step of feature transfer with the teacher run on
every batch, and with its features cached, against soft-target distillation from cached logits;
same student, same batches.

    OMP_NUM_THREADS=1 python benchmarks/feature_cost.py [--steps 5] [--rounds 5] [--teachers resnet-64 resnet-32]

Fashion-MNIST batches of 256, tinycnn-16 student, one thread. The variants alternate round by
round and the medians are quoted with their ratio to the cached run, measured in the same process
(this machine is shared). Writes benchmarks/results/feature_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from softkd.cache.features import FeatureTap
from softkd.data.datasets import load_splits
from softkd.methods import build_method
from softkd.models import Teacher, build_model
from softkd.models.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = {"resnet-64": "teachers/resnet64-fashion-mnist/teacher.safetensors",
               "resnet-32": "teachers/resnet32-fashion-mnist/teacher.safetensors"}
TAPS = {"resnet-64": "stages.1", "resnet-32": "stages.1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--teachers", nargs="+", default=["resnet-64", "resnet-32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_splits("fashion-mnist", val_fraction=0.1, seed=0).train
    batches = [{"x": train.x[i:i + 256], "y": train.y[i:i + 256]} for i in range(0, 256 * args.steps, 256)]
    teachers = {}
    for name in args.teachers:
        model = build_model(name, input_shape=(1, 28, 28), num_classes=10)
        load_weights(model, ROOT / CHECKPOINTS[name])
        teachers[name] = Teacher(model)
    variants = {}
    for name, teacher in teachers.items():
        with torch.no_grad():  # what the caches would hold
            logits = [teacher(b["x"]) for b in batches]
            features = [FeatureTap(teacher, TAPS[name])(b["x"]).half() for b in batches]
        feature = dict(student_layers=["4"], teacher_layers=[TAPS[name]])
        variants[f"soft-target, cached {name} logits"] = (
            build_method("soft-target", teachers=[]), [dict(b, teacher_logits=t) for b, t in zip(batches, logits)])
        variants[f"feature (hint 4→{TAPS[name]}), live {name}"] = (
            build_method("feature", teachers=[teacher], **feature), batches)
        variants[f"feature (hint 4→{TAPS[name]}), cached {name} features"] = (
            build_method("feature", teachers=[teacher], **feature),
            [dict(b, teacher_logits=t, teacher_feature0=f) for b, t, f in zip(batches, logits, features)])
    seconds = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant, (method, data) in variants.items():
            torch.manual_seed(0)
            student = build_model("tinycnn-16", input_shape=(1, 28, 28), num_classes=10)
            method.setup(student, data[0])
            params = [*student.parameters(), *(method.parts.parameters() if method.parts is not None else [])]
            opt = torch.optim.AdamW(params, lr=2e-3)
            student.train()
            method.train()
            started = time.perf_counter()
            for batch in data:
                opt.zero_grad(set_to_none=True)
                method(student, batch)["loss"].backward()
                opt.step()
            seconds[variant].append((time.perf_counter() - started) / len(data))
    medians = {v: statistics.median(s) for v, s in seconds.items()}
    results = []
    for name in teachers:
        cached = medians[f"soft-target, cached {name} logits"]
        for variant in [v for v in variants if name in v]:
            results.append({"variant": variant, "median_s_per_step": round(medians[variant], 4),
                            "ratio_to_cached": round(medians[variant] / cached, 2),
                            "s_per_epoch_211_steps": round(211 * medians[variant], 1), "runs": seconds[variant]})
            print(f"{variant:<52} {medians[variant]:.3f} s/step  ×{medians[variant] / cached:.1f}  "
                  f"(~{211 * medians[variant] / 60:.1f} min per Fashion-MNIST epoch)")
    out = ROOT / "benchmarks" / "results" / "feature_cost.json"
    out.write_text(json.dumps({"threads": 1, "batch_size": 256, "student": "tinycnn-16", "steps": args.steps,
                               "rounds": args.rounds, "torch": torch.__version__, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
