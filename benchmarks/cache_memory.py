"""Peak memory of building a soft-label cache: flat in the cache's size, since logits stream to disk.

For 25,000 / 50,000 / 100,000 / 200,000 samples, a fresh Python process builds a dense fp16 cache
of 1,000 classes (2,000 bytes a sample: 400 MB at 200,000) with ``SoftLabelCache.build`` from a
synthetic teacher, a seeded MLP 32 → 256 → 1,000 over Gaussian inputs held as an ArrayDataset of
N × 32 float32 (the inputs, labels and ids are the only arrays that grow with N; their bytes are
reported). Each process reports, from /proc/self/status:
  baseline: VmRSS after imports, the dataset and the teacher, just before the build;
  peak:     VmHWM during the build (the high-water mark is reset to the baseline first by writing
            5 to /proc/self/clear_refs), so peak - baseline is what the build itself needs.
Build seconds include fsync and hashing every shard. Afterwards the process opens the cache with
its fingerprint, re-hashes every shard (``cache.verify()``, what ``softkd cache verify`` runs) and
compares 2,048 random samples' cached logits with the teacher's (to fp16 rounding). The caches
live in a temporary folder under /tmp and are deleted after each size.

Run with the CPU timing environment docs/benchmarks.md gives:
  OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \
    python benchmarks/cache_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from softkd import ArrayDataset, SoftLabelCache
from softkd.cache import fingerprint, ids_sha256

ROOT = Path(__file__).resolve().parents[1]
FEATURES, HIDDEN, CLASSES = 32, 256, 1_000
MB = 1e6


def _memory() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 / MB for key in ("VmRSS", "VmHWM")}


def _build_once(n: int, folder: Path, *, batch_size: int, shard_size: int, seed: int) -> dict:
    """One size, in this (fresh) process: build, measure, check. The parent runs this per size."""
    torch.set_num_threads(1)
    after_imports = _memory()["VmRSS"]
    g = torch.Generator().manual_seed(seed)
    data = ArrayDataset(torch.randn(n, FEATURES, generator=g), name="synthetic")
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES))
    described = {"name": "synthetic", "n": n, "ids_sha256": ids_sha256(data.ids)}
    run_fingerprint = fingerprint(teacher=teacher, data=described, dtype="fp16")
    input_mb = sum(t.numel() * t.element_size() for t in (data.x, data.y, data.ids)) / MB

    baseline = _memory()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS, so the peak is the build's own
    start = time.perf_counter()
    SoftLabelCache.build(folder, teacher, data, fingerprint=run_fingerprint, dtype="fp16",
                         shard_size=shard_size, batch_size=batch_size)
    build_s = time.perf_counter() - start
    peak = _memory()["VmHWM"]

    start = time.perf_counter()
    cache = SoftLabelCache.open(folder, fingerprint=run_fingerprint)
    cache.verify()
    verify_s = time.perf_counter() - start
    positions = torch.randperm(n, generator=g)[:2_048]
    with torch.no_grad():
        expected = teacher(data.x[positions])
    error = (cache.logits(positions) - expected).abs()
    # fp16 keeps 11 significant bits: half an ulp is 2^-11 of the value (plus fp32 round-off).
    within_fp16 = bool((error <= expected.abs() * 2**-11 + 1e-6).all())
    return {
        "samples": n, "cache_bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "shards": len(cache.manifest["shards"]), "input_mb": input_mb, "rss_after_imports_mb": after_imports,
        "baseline_rss_mb": baseline, "peak_rss_mb": peak, "build_overhead_mb": peak - baseline,
        "build_s": build_s, "verify_s": verify_s, "verified": True,
        "spot_check_max_abs_error": float(error.max()), "spot_check_within_fp16": within_fp16,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--batch-size", type=int, default=1_024)
    parser.add_argument("--shard-size", type=int, default=16_384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # samples, in the per-size process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = {"batch_size": args.batch_size, "shard_size": args.shard_size, "seed": args.seed}
    if args.child is not None:
        print(json.dumps(_build_once(args.child, args.folder, **options)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="softkd-cache-memory-", dir="/tmp") as tmp:
        for n in args.samples:
            folder = Path(tmp) / f"cache-{n}"
            command = [sys.executable, __file__, "--child", str(n), "--folder", str(folder),
                       "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
                       "--seed", str(args.seed)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=False)
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # 400 MB at the largest size
            if done.returncode != 0:
                sys.exit(f"The build of {n:,} samples failed (exit {done.returncode}):\n{done.stderr}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{n:,} samples: built in {rows[-1]['build_s']:.1f} s", file=sys.stderr)

    result = {
        "command": " ".join(["python", "benchmarks/cache_memory.py", *sys.argv[1:]]), "args": {key: value for key, value in vars(args).items() if key not in ("child", "folder")},
        "classes": CLASSES, "dtype": "fp16", "sizes": rows,
        "machine": f"{platform.machine()}, 1 thread(s), torch {torch.__version__}, "
                   f"Python {platform.python_version()}, {platform.platform()}",
    }
    out = ROOT / "benchmarks" / "results" / "cache_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print("| samples | cache on disk | inputs | baseline RSS | peak RSS | peak − baseline | build | verified |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ok = "yes" if r["verified"] and r["spot_check_within_fp16"] else "NO"
        print(f"| {r['samples']:,} | {r['cache_bytes'] / MB:,.0f} MB | {r['input_mb']:.1f} MB | "
              f"{r['baseline_rss_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['build_overhead_mb']:.1f} MB | "
              f"{r['build_s']:.1f} s | {ok} |")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
