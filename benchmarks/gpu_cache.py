"""What the teacher costs a bf16 training epoch on one GPU, and what the soft-label cache saves.

tinycnn-16 student, resnet-64 teacher, Fashion-MNIST's train split resident on the device, bf16
autocast, one process. Images/s of a training epoch (fit's per-epoch log records: the epoch loop
only, no evaluation) for the rows below, with the engine's defaults (steps replayed from CUDA
graphs, the loss compiled; softkd.train.graphs), and two rows with every step eager:

  student-only     softkd.fit with plain cross-entropy: the floor a distillation run can reach;
  online           the teacher runs on every batch: softkd.fit with a SoftTarget objective that
                   holds the teacher (the batches carry no teacher_logits, so it runs the teacher),
                   over the same in-memory batches as the other rows;
  online (loader)  the same through distill()'s documented online path: a DataLoader as
                   train_data (its batches gathered on the device by a batch sampler);
  cached           a real SoftLabelCache built in a temporary folder, its logits read once with
                   cache.logits(positions) and passed as distill(teacher_logits=...);
  ... (eager)      student-only and cached with cuda_graphs=False.

Rows alternate over ``--repeats`` rounds; each round is one fit of ``--epochs`` epochs. A fit's
first epoch also records the graph (and, in the warm-up call only, compiles the loss); the
figures are the median over the later epochs ("steady"), with the first epochs' median and the
whole calls' wall time beside them. Target: cached >= 0.95 × student-only, steady epochs (PASS /
FAIL printed, never asserted). Also reported: the cache build and read times.

    bash benchmarks/gpu_cache.sh                       # on the GPU machine, from the repository root
    PYTHONPATH=src python benchmarks/gpu_cache.py --device cpu --smoke    # tiny end-to-end check
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile

import torch

# benchmarks/ is this script's folder, so its sibling imports directly.
from gpu_engine import (
    SETTINGS,
    build_student,
    common_arguments,
    describe,
    epoch_rate,
    load_data,
    load_teacher,
    machine,
    select_device,
    timed,
    verdict,
    write_result,
)

import softkd
from softkd.cache import fingerprint, ids_sha256

PRECISION = "bf16"
CACHE_TARGET = 0.95  # cached / student-only images/s
FIT_SETTINGS = {k: SETTINGS[k] for k in ("batch_size", "lr", "weight_decay")}
KD_SETTINGS = {k: SETTINGS[k] for k in ("temperature", "beta")}


class _DeviceBatches(torch.utils.data.Dataset):
    """Whole batches gathered on the device: used with a BatchSampler and batch_size=None, a
    DataLoader does no per-item Python work."""

    def __init__(self, data: softkd.ArrayDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, indices):
        index = torch.as_tensor(indices, device=self.data.x.device)
        return {"x": self.data.x[index], "y": self.data.y[index]}


def device_loader(data: softkd.ArrayDataset, *, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(seed)), batch_size, False)
    return torch.utils.data.DataLoader(_DeviceBatches(data), sampler=sampler, batch_size=None)


def build_cache(folder: str, teacher, train: softkd.ArrayDataset, device) -> tuple[dict, torch.Tensor]:
    """Build the cache, then read every logit back in dataset order; returns timings and the logits."""
    key = {"name": train.name, "split": "train", "n": len(train), "ids_sha256": ids_sha256(train.ids)}
    fingerprint_s, expected = timed(lambda: fingerprint(teacher=teacher, data=key, dtype="fp16"), device)
    build_s, cache = timed(lambda: softkd.SoftLabelCache.build(folder, teacher.module, train, fingerprint=expected,
                                                               dtype="fp16", batch_size=1024), device)
    read_s, logits = timed(lambda: cache.logits(torch.arange(len(cache))).to(device), device)
    info = cache.info()
    return {"fingerprint_s": fingerprint_s, "build_s": build_s, "read_s": read_s, "bytes": info["bytes"],
            "dtype": info["dtype"], "samples": info["samples"]}, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="rounds per row (default 3; smoke 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per round (default 3; smoke 2)")
    parser.add_argument("--no-loader-row", dest="loader_row", action="store_false",
                        help="skip the online row through a DataLoader")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.epochs = args.epochs or (2 if args.smoke else 3)

    device = select_device(args.device)
    train, _, data_source = load_data(args.data_dir, device, smoke=args.smoke)
    teacher, teacher_source = load_teacher(device)
    info = machine(device)
    print(f"{describe(info)}; data: {data_source} ({len(train):,} train on {device}); "
          f"teacher resnet-64 ({teacher_source}); student tinycnn-16; {PRECISION}, batch {SETTINGS['batch_size']}")
    with tempfile.TemporaryDirectory(prefix="softkd-cache-") as folder:
        cache, cached_logits = build_cache(folder, teacher, train, device)
    print(f"  cache: built in {cache['build_s']:.2f} s ({cache['samples']:,} samples, {cache['dtype']}, "
          f"{cache['bytes'] / 2**20:.2f} MiB; fingerprint {cache['fingerprint_s']:.2f} s), "
          f"all logits read back in {cache['read_s']:.3f} s")

    student0 = build_student(args.seed, device)
    common = dict(precision=PRECISION, seed=args.seed, **FIT_SETTINGS)

    def student_only(log, **budget):
        return softkd.fit(copy.deepcopy(student0), train, log=log, **budget, **common)

    def online(log, **budget):
        objective = softkd.SoftTarget(teacher=teacher, **KD_SETTINGS)
        return softkd.fit(copy.deepcopy(student0), train, objective=objective, log=log, **budget, **common)

    def online_loader(log, **budget):
        loader = device_loader(train, batch_size=SETTINGS["batch_size"], seed=args.seed)
        return softkd.distill(copy.deepcopy(student0), teacher, loader, log=log, **KD_SETTINGS, **budget, **common)

    def cached(log, **budget):
        return softkd.distill(copy.deepcopy(student0), None, train, teacher_logits=cached_logits, log=log,
                              **KD_SETTINGS, **budget, **common)

    rows = {"student_only": student_only, "online": online, "cached": cached,
            "student_only_eager": functools.partial(student_only, cuda_graphs=False),
            "cached_eager": functools.partial(cached, cuda_graphs=False)}
    if args.loader_row:
        rows["online_loader"] = online_loader
    for run in rows.values():  # warm-up: kernels chosen, allocator filled, losses compiled
        run(None, epochs=1, max_steps=2 if args.smoke else 20)
    records = {name: [] for name in rows}
    walls = {name: [] for name in rows}
    graphed = {}
    for repeat in range(args.repeats):
        names = list(rows) if repeat % 2 == 0 else list(reversed(rows))
        for name in names:
            wall, result = timed(functools.partial(rows[name], records[name].append, epochs=args.epochs), device)
            walls[name].append(wall)
            graphed[name] = {"steps": result.steps, "replayed": result.graphed_steps}
    rates = {name: epoch_rate([x for x in r if x["epoch"] > 1]) for name, r in records.items()}
    first = {name: epoch_rate([x for x in r if x["epoch"] == 1]) for name, r in records.items()}
    wall_rates = {name: len(train) * args.epochs / statistics.median(w) for name, w in walls.items()}
    ratios = {f"{name}/student_only": rates[name] / rates["student_only"] for name in rows if name != "student_only"}
    ratios["cached_eager/student_only_eager"] = rates["cached_eager"] / rates["student_only_eager"]
    first_ratios = {f"{name}/student_only": first[name] / first["student_only"] for name in rows
                    if name != "student_only"}
    wall_ratios = {f"{name}/student_only": wall_rates[name] / wall_rates["student_only"] for name in rows
                   if name != "student_only"}
    result = {
        "benchmark": "gpu_cache", "smoke": args.smoke, "machine": info, "data": data_source,
        "train_samples": len(train), "teacher": teacher_source, "precision": PRECISION, "settings": SETTINGS,
        "repeats": args.repeats, "epochs_per_round": args.epochs, "cache": cache, "images_per_s": rates,
        "first_epoch_images_per_s": first, "call_images_per_s": wall_rates, "graphed_steps": graphed,
        "epoch_images_per_s": {name: [x["images_per_s"] for x in r] for name, r in records.items()},
        "call_wall_s": walls, "ratios": ratios, "first_epoch_ratios": first_ratios, "call_ratios": wall_ratios,
        "targets": {"cached_at_least_0.95_student_only": ratios["cached/student_only"] >= CACHE_TARGET},
    }
    labels = {"student_only": "student-only (CE)", "online": "online teacher (fit + SoftTarget)",
              "online_loader": "online teacher (distill, DataLoader)", "cached": "cached logits (distill)",
              "student_only_eager": "student-only, eager steps", "cached_eager": "cached logits, eager steps"}
    print(f"  images/s, {args.repeats} alternating round(s) of {args.epochs} epochs; steady = median of epochs "
          "2+, first = median of first epochs (records the graph), call = whole fit calls")
    print(f"    {'':<38} {'steady':>10} {'× student':>10} {'first':>10} {'× student':>10} {'call':>10} "
          f"{'× student':>10} {'replayed':>9}")
    for name in rows:
        key = f"{name}/student_only"
        cells = [f"{rates[name]:>10,.0f}", f"{ratios.get(key, 1.0):>10.3f}", f"{first[name]:>10,.0f}",
                 f"{first_ratios.get(key, 1.0):>10.3f}", f"{wall_rates[name]:>10,.0f}",
                 f"{wall_ratios.get(key, 1.0):>10.3f}", f"{graphed[name]['replayed']:>4}/{graphed[name]['steps']:<4}"]
        print(f"    {labels[name]:<38} {' '.join(cells)}")
    print(f"  online / student-only = {ratios['online/student_only']:.3f}; "
          f"cached / student-only = {ratios['cached/student_only']:.3f} (eager steps: "
          f"{ratios['cached_eager/student_only_eager']:.3f}); CUDA graphs / eager: student-only "
          f"{rates['student_only'] / rates['student_only_eager']:.2f}×, cached "
          f"{rates['cached'] / rates['cached_eager']:.2f}×")
    print(f"  {verdict(result['targets']['cached_at_least_0.95_student_only'])}  cached >= {CACHE_TARGET} × "
          "student-only images/s")
    print(f"wrote {write_result('gpu_cache', result, smoke=args.smoke)}")


if __name__ == "__main__":
    main()
