"""Size on disk and fidelity of the soft-label cache formats: dense fp16, dense fp32, top-k.

For a synthetic teacher with 1,000 classes and one with 32,000, real caches are built with
``SoftLabelCache.build`` in a temporary folder and read back with ``cache.logits(ids)``:
  bytes/sample: the shard files' sizes on disk divided by the number of samples;
  KL:           mean KL(full ‖ cached) in nats, computed in float64, where full = softmax(z / T) of
                the teacher's raw fp32 logits z and cached = softmax(cache.logits(ids) / T), at
                T = 1 and T = 4 (the distillation temperature; the loss multiplies KL by T²).
A top-k cache keeps the k largest logits and spreads the mass of the other C - k classes evenly
over them, so at T = 1 it keeps the tail's total mass exactly and only loses its shape; at T > 1
the tail carries more mass and its shape matters more.

The teacher is a fixed seeded linear layer z = s·Wx + b over Gaussian inputs x (64 features),
W ~ N(0, 1/64), with a Zipf prior b_c = -log(rank_c) over a random ranking of the classes (as
word or label frequencies), so that the tail is long rather than flat. The scale s is set by
bisection so that the mean top-1 probability at T = 1 is ``--top1`` (0.6 by default); the table
reports the teacher's entropy and the mass in its top k at each T so a reader can judge it.

Run with the CPU timing environment docs/benchmarks.md gives:
  OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \
    python benchmarks/cache_formats.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softkd import ArrayDataset, SoftLabelCache
from softkd.cache import fingerprint, ids_sha256

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 64
TEMPERATURES = (1.0, 4.0)


def _teacher(num_classes: int, x: torch.Tensor, *, top1: float, seed: int) -> tuple[nn.Linear, float]:
    """The linear teacher described in the module docstring, and its logit scale s."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, FEATURES, generator=g) / math.sqrt(FEATURES)
    rank = torch.randperm(num_classes, generator=g) + 1
    bias = -rank.double().log().float()
    features = x @ weight.T  # (N, C), computed once for the bisection

    def mean_top1(scale: float) -> float:
        return float(F.softmax(scale * features + bias, dim=-1).max(-1).values.mean())

    lo, hi = 0.0, 1.0
    while mean_top1(hi) < top1:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_top1(mid) < top1 else (lo, mid)
    scale = (lo + hi) / 2
    teacher = nn.Linear(FEATURES, num_classes)
    with torch.no_grad():
        teacher.weight.copy_(scale * weight)
        teacher.bias.copy_(bias)
    return teacher, scale


def _teacher_stats(logits: torch.Tensor, top_k: int) -> dict:
    """Mean top-1 probability, entropy (nats) and top-k mass of softmax(z / T) at each T."""
    stats = {}
    for t in TEMPERATURES:
        log_probs = F.log_softmax(logits.double() / t, dim=-1)
        probs = log_probs.exp()
        stats[f"T={t:g}"] = {
            "top1_prob": float(probs.max(-1).values.mean()),
            "entropy": float(-(probs * log_probs).sum(-1).mean()),
            f"top{top_k}_mass": float(probs.topk(top_k, dim=-1).values.sum(-1).mean()),
        }
    return stats


def _kl(full_logits: torch.Tensor, cached_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(full / T) ‖ softmax(cached / T)) per sample, in float64."""
    full = F.log_softmax(full_logits.double() / temperature, dim=-1)
    cached = F.log_softmax(cached_logits.double() / temperature, dim=-1)
    return (full.exp() * (full - cached)).sum(-1)


def _measure(folder: Path, teacher: nn.Module, data: ArrayDataset, raw: torch.Tensor, *, dtype: str,
             top_k: int | None, mass_k: int, batch_size: int) -> dict:
    described = {"name": "synthetic", "n": len(data), "ids_sha256": ids_sha256(data.ids)}
    run_fingerprint = fingerprint(teacher=teacher, data=described, dtype=dtype, top_k=top_k)
    start = time.perf_counter()
    cache = SoftLabelCache.build(folder, teacher, data, fingerprint=run_fingerprint, dtype=dtype, top_k=top_k,
                                 batch_size=batch_size)
    build_s = time.perf_counter() - start
    disk = sum((folder / entry["file"]).stat().st_size for entry in cache.manifest["shards"])
    cached = cache.logits(torch.arange(len(data)))
    result = {"dtype": dtype, "top_k": top_k, "bytes_per_sample": disk / len(data),
              "record_bytes": cache.info()["bytes_per_sample"], "build_s": build_s}
    top = raw.topk(mass_k, dim=-1).indices  # the teacher's own top classes
    for t in TEMPERATURES:
        kl = _kl(raw, cached, t)
        result[f"kl_T{t:g}_mean"], result[f"kl_T{t:g}_max"] = float(kl.mean()), float(kl.max())
        probs = F.softmax(cached.double() / t, dim=-1)
        result[f"top{mass_k}_mass_T{t:g}"] = float(probs.gather(-1, top).sum(-1).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000, 32_000])
    parser.add_argument("--samples", type=int, nargs="+", default=[2_048, 512], help="one per --classes entry")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--top1", type=float, default=0.6, help="the teacher's mean top-1 probability at T = 1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if len(args.samples) != len(args.classes):
        parser.error(f"give one --samples per --classes entry; got {len(args.samples)} for {len(args.classes)}.")
    torch.set_num_threads(1)

    teachers, rows = [], []
    with tempfile.TemporaryDirectory(prefix="softkd-cache-formats-", dir="/tmp") as tmp:
        for num_classes, n in zip(args.classes, args.samples):
            x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(args.seed + 1))
            teacher, scale = _teacher(num_classes, x, top1=args.top1, seed=args.seed)
            data = ArrayDataset(x, name=f"synthetic-{num_classes}")
            with torch.no_grad():
                # The same batches as the build, so the fp32 cache can match these logits bit for bit.
                raw = torch.cat([teacher(x[i : i + args.batch_size]) for i in range(0, n, args.batch_size)])
            teachers.append({"classes": num_classes, "samples": n, "scale": scale, **_teacher_stats(raw, args.top_k)})
            for dtype, top_k in (("fp32", None), ("fp16", None), ("fp16", args.top_k)):
                folder = Path(tmp) / f"c{num_classes}-{dtype}-k{top_k}"
                rows.append({"classes": num_classes, "samples": n,
                             **_measure(folder, teacher, data, raw, dtype=dtype, top_k=top_k, mass_k=args.top_k,
                                        batch_size=args.batch_size)})

    result = {
        "command": " ".join(["python", "benchmarks/cache_formats.py", *sys.argv[1:]]), "args": vars(args),
        "teachers": teachers, "formats": rows,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
                   f"Python {platform.python_version()}, {platform.platform()}",
    }
    out = ROOT / "benchmarks" / "results" / "cache_formats.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    k = args.top_k
    print(f"Teachers (mean over samples; entropy in nats, top-{k} mass = probability in the {k} largest):\n")
    print(f"| classes | samples | top-1 prob T=1 | entropy T=1 | top-{k} mass T=1 | entropy T=4 | top-{k} mass T=4 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t in teachers:
        one, four = t["T=1"], t["T=4"]
        print(f"| {t['classes']:,} | {t['samples']:,} | {one['top1_prob']:.3f} | {one['entropy']:.2f} | "
              f"{one[f'top{k}_mass']:.3f} | {four['entropy']:.2f} | {four[f'top{k}_mass']:.3f} |")
    print("\nFormats (bytes/sample from the shard files; KL(full ‖ cached) in nats, mean over samples; "
          f"top-{k} mass = cached probability on the teacher's {k} largest classes):\n")
    print(f"| classes | format | bytes/sample | vs fp32 | KL T=1 | KL T=4 | top-{k} mass T=4 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    fp32 = {r["classes"]: r["bytes_per_sample"] for r in rows if r["dtype"] == "fp32" and r["top_k"] is None}
    for r in rows:
        name = f"dense {r['dtype']}" if r["top_k"] is None else f"top-{r['top_k']} {r['dtype']}"
        print(f"| {r['classes']:,} | {name} | {r['bytes_per_sample']:,.0f} | {r['bytes_per_sample'] / fp32[r['classes']]:.4f} | "
              f"{r['kl_T1_mean']:.2e} | {r['kl_T4_mean']:.2e} | {r[f'top{k}_mass_T4']:.3f} |")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
