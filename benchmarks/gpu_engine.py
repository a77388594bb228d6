"""softkd's training engine on one GPU: bf16 against fp32, and softkd against the plain loop.

The tinycnn-16 ← resnet-64 Fashion-MNIST recipe's settings, the whole dataset resident on the
device, the teacher's logits computed once beforehand (so only the student trains):

  (a) precision: the same seed trained in fp32 and in bf16 autocast for ``--epochs`` epochs;
      images/s of each (epoch time without evaluation, from fit's per-epoch log records), test
      accuracy of each, and whether a loss went NaN, over ``--seeds`` seeds each. Targets: bf16 trains
      without NaN, and its mean test accuracy is within 0.3 points of fp32's (one seed's gap alone
      is seed noise of about that size; the per-seed gaps are printed beside the means).
  (b) engine: softkd.distill against examples/kd_plain_torch.py in the same process, alternating
      which runs first, both reading the same precomputed logits, so the ratio is softkd's own
      overhead. Target: softkd / plain images/s >= 0.95.

Targets are printed as PASS / FAIL, never asserted. The JSON goes to $OUT (or benchmarks/results/).

    bash benchmarks/gpu_engine.sh                       # on the GPU machine, from the repository root
    PYTHONPATH=src python benchmarks/gpu_engine.py --device cpu --smoke    # tiny end-to-end check
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import softkd
from softkd.data.datasets import build_dataset
from softkd.errors import SoftKDError, TrainingError
from softkd.models.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "teachers" / "resnet64-fashion-mnist" / "teacher.safetensors"
INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10
SETTINGS = {"temperature": 4.0, "beta": 0.9, "batch_size": 256, "lr": 2e-3, "weight_decay": 5e-4}
SMOKE_SIZES = {"train": 512, "test": 256}
ACCURACY_TOLERANCE = 0.3  # points of test accuracy between bf16 and fp32
ENGINE_TARGET = 0.95  # softkd / plain images/s


# ----------------------------------------------------------------------------------------------
# Shared with benchmarks/gpu_cache.py
# ----------------------------------------------------------------------------------------------

def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's four IDX files")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script end to end on a CPU")
    parser.add_argument("--seed", type=int, default=0)


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda, but torch {torch.__version__} sees no CUDA device; use --device cpu --smoke.")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, fn()) with the device's queued work finished on both sides of the clock."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def load_data(data_dir: str | None, device: torch.device, *, smoke: bool, seed: int = 0):
    """(train, test, source): Fashion-MNIST's train split (test stays on the CPU, evaluation is not
    timed), or a synthetic stand-in of the same shape when the IDX files are not found."""
    try:
        splits = build_dataset("fashion-mnist", val_fraction=0.1, seed=0, data_dir=data_dir)
        train, test, source = splits.train, splits.test, "fashion-mnist"
    except SoftKDError as error:
        banner = ("WARNING: Fashion-MNIST not found; using a SYNTHETIC dataset of the same shape "
                  "(54,000 train / 10,000 test, 1×28×28, 10 classes). Throughput holds; accuracies say "
                  f"nothing about Fashion-MNIST. ({error})")
        print(banner, file=sys.stderr)
        print(banner)
        train, test, source = _synthetic(54_000, seed), _synthetic(10_000, seed + 1), "synthetic"
    if smoke:
        train = train.subset(torch.arange(SMOKE_SIZES["train"]), name=train.name)
        test = test.subset(torch.arange(SMOKE_SIZES["test"]), name=test.name)
    return on_device(train, device), test, source


def _synthetic(n: int, seed: int) -> softkd.ArrayDataset:
    """Learnable stand-in: each class a fixed random 28×28 pattern under uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(NUM_CLASSES, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    x = 0.4 * prototypes[y] + 0.6 * torch.rand(n, *INPUT_SHAPE, generator=generator)
    return softkd.ArrayDataset(x, y, num_classes=NUM_CLASSES, name=f"synthetic-{n}")


def on_device(data: softkd.ArrayDataset, device: torch.device) -> softkd.ArrayDataset:
    """The whole dataset as device tensors (ids too), so batches are gathered on the device."""
    return softkd.ArrayDataset(data.x.to(device), data.y.to(device), ids=data.ids.to(device),
                               num_classes=data.num_classes, name=data.name)


def load_teacher(device: torch.device):
    """(frozen resnet-64 on ``device``, "reference weights" | "random weights")."""
    module = softkd.build_model("resnet-64", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)
    source = "reference weights"
    if TEACHER.is_file():
        load_weights(module, TEACHER)
    else:
        source = "random weights"
        print(f"WARNING: {TEACHER.relative_to(ROOT)} not found; the teacher has random weights "
              "(throughput holds, accuracies do not).")
    return softkd.Teacher(module.to(device)), source


def build_student(seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return softkd.build_model("tinycnn-16", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES).to(device)


def test_accuracy(model: torch.nn.Module, test: softkd.ArrayDataset) -> float:
    return softkd.evaluate(model, softkd.build_loader(test, batch_size=1024))["accuracy"]


def teacher_logits(teacher, train: softkd.ArrayDataset) -> torch.Tensor:
    """The teacher's logits on ``train`` in order, on the data's device."""
    logits = teacher.predict_logits(softkd.build_loader(train, batch_size=1024))
    return logits.to(train.x.device)


def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def describe(info: dict) -> str:
    return f"{info.get('gpu', info['cpu'] + ' CPU')}, torch {info['torch']}"


def write_result(name: str, result: dict, *, smoke: bool) -> Path:
    """$OUT/<name>.json when the device tool sets OUT, else benchmarks/results/; -smoke for smoke runs."""
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'-smoke' if smoke else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def verdict(passed: bool | None) -> str:
    return "PASS" if passed else "FAIL"


def epoch_rate(records: list[dict]) -> float:
    """Median images/s over fit's per-epoch records (the epoch loop only: no evaluation ran)."""
    return statistics.median(r["images_per_s"] for r in records if r.get("kind") != "step")


# ----------------------------------------------------------------------------------------------
# (a) bf16 against fp32
# ----------------------------------------------------------------------------------------------

def train_in(precision: str, seed: int, train, test, logits, device, *, epochs: int) -> dict:
    """One distillation run; a non-finite loss (softkd stops with TrainingError) is reported, not raised."""
    records: list[dict] = []
    student = build_student(seed, device)
    wall, error = None, None
    try:
        wall, _ = timed(lambda: softkd.distill(student, None, train, teacher_logits=logits, epochs=epochs,
                                               precision=precision, seed=seed, log=records.append, **SETTINGS),
                        device)
    except TrainingError as exc:
        error = str(exc)
    losses = [r["train_loss"] for r in records]
    nan = error is not None or not all(math.isfinite(v) for v in losses)
    return {
        "precision": precision, "seed": seed, "epochs": epochs, "nan": nan, "error": error,
        "images_per_s": epoch_rate(records) if records else None,
        "epoch_s": [r["epoch_s"] for r in records], "train_loss": losses, "wall_s": wall,
        "test_accuracy": None if error else test_accuracy(student, test),
    }


def compare_precisions(train, test, logits, device, args) -> dict:
    """fp32 and bf16 over the same ``args.seeds`` seeds: a single seed's gap is seed noise of about the
    tolerance's size, so the target is on the means; the paired per-seed gaps are reported beside it."""
    for precision in ("fp32", "bf16"):  # warm-up: kernels chosen, allocator filled
        softkd.distill(build_student(args.seed, device), None, train, teacher_logits=logits, epochs=1,
                       max_steps=10, precision=precision, seed=args.seed, **SETTINGS)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {p: [train_in(p, s, train, test, logits, device, epochs=args.epochs) for s in seeds]
            for p in ("fp32", "bf16")}
    print(f"(a) precision: tinycnn-16 on {len(train):,} samples with precomputed resnet-64 logits, "
          f"{args.epochs} epoch(s), batch {SETTINGS['batch_size']}, seeds {seeds}")
    summary = {}
    for precision, rs in runs.items():
        rates = [r["images_per_s"] for r in rs if r["images_per_s"]]
        accuracies = [100 * r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        summary[precision] = {
            "images_per_s": statistics.median(rates) if rates else None,
            "accuracy_mean": statistics.mean(accuracies) if accuracies else None,
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracies": accuracies, "nan": any(r["nan"] for r in rs)}
        row = summary[precision]
        rate = "n/a" if row["images_per_s"] is None else f"{row['images_per_s']:,.0f}"
        accuracy = ("n/a" if row["accuracy_mean"] is None
                    else f"{row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} % "
                         f"({', '.join(f'{a:.2f}' for a in accuracies)})")
        print(f"  {precision}: {rate} images/s (median), test accuracy {accuracy}, "
              f"NaN loss: {'YES' if row['nan'] else 'no'}")
    fp32, bf16 = summary["fp32"], summary["bf16"]
    part = {"seeds": seeds, "runs": runs, "summary": summary}
    if fp32["images_per_s"] and bf16["images_per_s"]:
        part["bf16_over_fp32_images_per_s"] = bf16["images_per_s"] / fp32["images_per_s"]
        print(f"  bf16 / fp32 images/s = {part['bf16_over_fp32_images_per_s']:.3f}")
    complete = all(r["test_accuracy"] is not None for rs in runs.values() for r in rs)
    gap = bf16["accuracy_mean"] - fp32["accuracy_mean"] if complete else None
    part["accuracy_gap_points"] = gap
    if complete:
        part["paired_gaps_points"] = [100 * (b["test_accuracy"] - f["test_accuracy"])
                                      for f, b in zip(runs["fp32"], runs["bf16"])]
        print(f"  bf16 − fp32 per seed: {', '.join(f'{g:+.2f}' for g in part['paired_gaps_points'])} points")
    part["targets"] = {"bf16_no_nan": not bf16["nan"],
                       "bf16_accuracy_within_0.3": gap is not None and abs(gap) <= ACCURACY_TOLERANCE}
    print(f"  {verdict(part['targets']['bf16_no_nan'])}  bf16 trains without a NaN loss")
    shown = "n/a" if gap is None else f"{gap:+.2f}"
    print(f"  {verdict(part['targets']['bf16_accuracy_within_0.3'])}  bf16 mean test accuracy within "
          f"{ACCURACY_TOLERANCE} points of fp32's (bf16 − fp32 = {shown} points, {len(seeds)} seed(s))")
    return part


# ----------------------------------------------------------------------------------------------
# (b) softkd against the plain loop
# ----------------------------------------------------------------------------------------------

def plain_module():
    spec = importlib.util.spec_from_file_location("kd_plain_torch", ROOT / "examples" / "kd_plain_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_engines(train, logits, teacher, device, args) -> dict:
    plain = plain_module()
    student0 = build_student(args.seed, device)
    precision, epochs = args.engine_precision, args.engine_epochs
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    records: list[dict] = []

    def softkd_run(data, logits_, n_epochs, log=None):
        softkd.distill(copy.deepcopy(student0), None, data, teacher_logits=logits_, epochs=n_epochs,
                       precision=precision, seed=args.seed, log=log, **SETTINGS)

    def plain_run(x, y, logits_, n_epochs):
        # The plain loop has no precision option: autocast around it, as softkd puts it around its forward.
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            plain.distill_plain(copy.deepcopy(student0), teacher, x, y, teacher_logits=logits_, epochs=n_epochs,
                                seed=args.seed, **SETTINGS)

    warm = min(len(train), 4096)
    warm_data = train.subset(torch.arange(warm))
    softkd_run(warm_data, logits[:warm], 1)
    plain_run(train.x[:warm], train.y[:warm], logits[:warm], 1)
    seconds = {"softkd": [], "plain": []}
    for repeat in range(args.repeats):
        order = ("softkd", "plain") if repeat % 2 == 0 else ("plain", "softkd")
        for engine in order:
            if engine == "softkd":
                s, _ = timed(lambda: softkd_run(train, logits, epochs, records.append), device)
            else:
                s, _ = timed(lambda: plain_run(train.x, train.y, logits, epochs), device)
            seconds[engine].append(s)
    images = len(train) * epochs
    rates = {k: [images / s for s in v] for k, v in seconds.items()}
    ratios = [a / b for a, b in zip(rates["softkd"], rates["plain"])]
    part = {
        "precision": precision, "epochs_per_call": epochs, "samples": len(train), "repeats": args.repeats,
        "seconds": seconds, "images_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "softkd_in_loop_images_per_s": epoch_rate(records),
        "ratios": ratios, "ratio_median": statistics.median(ratios),
    }
    part["targets"] = {"softkd_over_plain_at_least_0.95": part["ratio_median"] >= ENGINE_TARGET}
    print(f"(b) engine: softkd.distill vs examples/kd_plain_torch.py, {precision}, same precomputed logits, "
          f"{args.repeats} alternating pair(s) of {epochs} epoch(s) on {len(train):,} samples")
    print(f"  softkd {part['images_per_s']['softkd']:,.0f} images/s (whole call; "
          f"{part['softkd_in_loop_images_per_s']:,.0f} inside its epoch loop), "
          f"plain {part['images_per_s']['plain']:,.0f} images/s")
    print(f"  softkd / plain images/s = {part['ratio_median']:.3f} (median; pairs "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"  {verdict(part['targets']['softkd_over_plain_at_least_0.95'])}  softkd / plain >= {ENGINE_TARGET}")
    return part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per precision in (a) (default 10; smoke 1)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per precision in (a) (default 3; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="A/B pairs in (b) (default 5; smoke 1)")
    parser.add_argument("--engine-epochs", type=int, default=1, help="epochs per timed call in (b)")
    parser.add_argument("--engine-precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--skip", choices=("a", "b"), action="append", default=[], help="skip a part")
    args = parser.parse_args()
    args.epochs = args.epochs or (1 if args.smoke else 10)
    args.seeds = args.seeds or (1 if args.smoke else 3)
    args.repeats = args.repeats or (1 if args.smoke else 5)

    device = select_device(args.device)
    train, test, data_source = load_data(args.data_dir, device, smoke=args.smoke)
    teacher, teacher_source = load_teacher(device)
    logits_s, logits = timed(lambda: teacher_logits(teacher, train), device)
    info = machine(device)
    result = {"benchmark": "gpu_engine", "smoke": args.smoke, "machine": info, "data": data_source,
              "train_samples": len(train), "test_samples": len(test), "teacher": teacher_source,
              "settings": SETTINGS, "teacher_logits_s": logits_s}
    print(f"{describe(info)}; data: {data_source} ({len(train):,} train on {device}, {len(test):,} test); "
          f"teacher resnet-64 ({teacher_source}), logits computed once in {logits_s:.1f} s")
    if "a" not in args.skip:
        result["precision"] = compare_precisions(train, test, logits, device, args)
        write_result("gpu_engine", result, smoke=args.smoke)  # kept even if (b) runs out of time
    if "b" not in args.skip:
        result["engine"] = compare_engines(train, logits, teacher, device, args)
    print(f"wrote {write_result('gpu_engine', result, smoke=args.smoke)}")


if __name__ == "__main__":
    main()
