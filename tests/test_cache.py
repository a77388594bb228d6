"""Soft-label cache: exact logits, top-k reconstruction, views, fingerprints, corruption, resume."""

from __future__ import annotations

import json
import math
import pickle
import re
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from softkd.cache import (
    CacheError,
    SoftLabelCache,
    differences,
    fingerprint,
    ids_sha256,
)
from softkd.cache.fingerprint import teacher_sha256
from softkd.data import ArrayDataset
from softkd.models import Teacher, build_model


@pytest.fixture(scope="module")
def data(digit_splits):
    return digit_splits.train.subset(torch.arange(300), name="digits/train")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10).eval()


@pytest.fixture(scope="module")
def wide():
    """1,000 classes with a peaked softmax, over 300 random 8-dim inputs."""
    torch.manual_seed(1)
    linear = nn.Linear(8, 1000)
    with torch.no_grad():
        linear.weight.mul_(20)
    return linear, ArrayDataset(torch.randn(300, 8), name="random")


def fp(teacher, data, **options):
    described = {"name": data.name, "n": len(data), "ids_sha256": ids_sha256(data.ids)}
    return fingerprint(teacher=teacher, data=described, **options)


def build(folder, teacher, data, *, dtype="fp32", top_k=None, views=1, augment_seed=None, **kwargs):
    stated = fp(teacher, data, dtype=dtype, top_k=top_k, views=views, augment_seed=augment_seed)
    return SoftLabelCache.build(folder, teacher, data, fingerprint=stated, dtype=dtype, top_k=top_k,
                                views=views, **kwargs)


def batched(teacher, x, *, shard_size, batch_size):
    """teacher(x) over the builder's batch grid: the same matmuls, so fp32 results match bit for bit."""
    with torch.no_grad():
        return torch.cat([teacher(x[lo:min(lo + batch_size, start + shard_size, len(x))])
                          for start in range(0, len(x), shard_size)
                          for lo in range(start, min(start + shard_size, len(x)), batch_size)])


def shift(x, ids, view):
    """A deterministic augmentation: view v rolls each image v pixels to the right."""
    return torch.roll(x, shifts=int(view), dims=-1)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.bin"))}


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------

def test_dense_fp32_logits_equal_the_teacher_across_shard_boundaries(tmp_path, teacher, data):
    cache = build(tmp_path, teacher, data, dtype="fp32", shard_size=64, batch_size=32)
    expected = batched(teacher, data.x, shard_size=64, batch_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [f"shard-0000{i}.bin" for i in range(5)]
    positions = torch.tensor([0, 63, 64, 65, 127, 128, 255, 256, 299, 5, 200, 63])
    assert torch.equal(cache.logits(positions), expected[positions])
    assert torch.equal(cache.logits(torch.arange(300)), expected)
    assert cache.logits(positions).dtype == torch.float32

    info = cache.info()
    assert (info["samples"], info["classes"], info["views"], info["shards"]) == (300, 10, 1, 5)
    assert (info["dtype"], info["top_k"], info["bytes_per_sample"], info["bytes"]) == ("fp32", None, 40, 12000)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    last = manifest["shards"][-1]
    assert (last["file"], last["samples"], last["bytes"]) == ("shard-00004.bin", 44, 44 * 40)
    assert manifest["softkd_version"] == info["version"] and manifest["created"].endswith("+00:00")

    copy = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker receives
    assert len(pickle.dumps(cache)) < 12000 and torch.equal(copy.logits(positions), expected[positions])
    with pytest.raises(CacheError, match=r"positions 0\.\.299; got 0\.\.300"):
        cache.logits(torch.tensor([0, 300]))


def test_dense_fp16_logits_are_the_teacher_rounded_to_fp16(tmp_path, teacher, data):
    cache = build(tmp_path, teacher, data, dtype="fp16", shard_size=100, batch_size=50)
    expected = batched(teacher, data.x, shard_size=100, batch_size=50)
    assert torch.equal(cache.logits(torch.arange(300)), expected.half().float())
    assert cache.info()["bytes_per_sample"] == 20


def test_top_k_keeps_the_k_logits_and_the_exact_tail_mass(tmp_path, wide):
    linear, data = wide
    with torch.no_grad():
        full = linear(data.x)
    p, kl = full.log_softmax(-1), {}
    for k in (10, 100):
        cache = build(tmp_path / f"k{k}", linear, data, top_k=k, shard_size=128, batch_size=64)
        positions = torch.tensor([3, 127, 128, 299, 0])
        rebuilt = cache.logits(positions)
        top = full[positions].topk(k, dim=-1)
        assert torch.equal(rebuilt.gather(1, top.indices), top.values)
        in_top = torch.zeros_like(full[positions], dtype=torch.bool).scatter(1, top.indices, True)
        tail_logit = rebuilt[~in_top].reshape(len(positions), 1000 - k)
        assert torch.equal(tail_logit, tail_logit[:, :1].expand_as(tail_logit))  # spread uniformly
        q = rebuilt.log_softmax(-1)
        tail_mass = p[positions].exp().masked_fill(in_top, 0).sum(-1)
        assert torch.allclose(q.exp().masked_fill(in_top, 0).sum(-1), tail_mass, rtol=1e-5, atol=1e-7)
        kl[k] = (p[positions].exp() * (p[positions] - q)).sum(-1)
        # KL = m · KL(tail/m ‖ uniform) <= m · log(C - k) for tail mass m
        assert (kl[k] >= -1e-6).all() and (kl[k] <= tail_mass * math.log(1000 - k) + 1e-5).all()
        soft = (rebuilt / 4.0).softmax(-1)  # any temperature: a valid distribution
        assert torch.isfinite(soft).all() and torch.allclose(soft.sum(-1), torch.ones(len(positions)))
        assert cache.info()["bytes_per_sample"] == k * 8 + 4
    assert kl[100].mean() < 0.01 < kl[10].mean() < 0.2  # what a peaked 1,000-class teacher loses

    every = build(tmp_path / "all", linear, data, top_k=1000, shard_size=128)
    assert torch.equal(every.logits(torch.arange(300)), full)  # k == C: nothing lost, KL exactly 0


def test_views_replay_the_view_fn(tmp_path, teacher, data):
    cache = build(tmp_path, teacher, data, views=3, augment_seed=0, view_fn=shift, shard_size=128, batch_size=64)
    assert cache.views == 3 and cache.info()["bytes_per_sample"] == 3 * 10 * 4
    for view in range(3):
        expected = batched(teacher, shift(data.x, data.ids, view), shard_size=128, batch_size=64)
        assert torch.equal(cache.logits(torch.arange(300), view), expected)
    positions, views = torch.tensor([0, 127, 128, 299]), torch.tensor([2, 0, 1, 2])
    per_view = torch.stack([cache.logits(positions, v) for v in range(3)])  # (V, B, C)
    assert torch.equal(cache.logits(positions, views), per_view[views, torch.arange(4)])
    assert not torch.equal(per_view[0], per_view[1])


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------

def test_fingerprint_fields_and_differences(teacher, data):
    a = fp(teacher, data, dtype="fp16")
    assert set(a) == {"teacher_sha256", "data", "preprocessing", "views", "augment_seed", "dtype", "top_k"}
    assert a == fp(Teacher(build_model_copy(teacher)), data, dtype="fp16")  # the wrapper hashes like the module
    changed = build_model_copy(teacher)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert teacher_sha256(changed) != a["teacher_sha256"]
    b = {**a, "top_k": 5, "data": {**a["data"], "n": 200}}
    assert differences(a, b) == ["data.n: 200 -> 300", "top_k: 5 -> null"]
    assert differences(a, dict(a)) == []
    with pytest.raises(CacheError, match="JSON data"):
        fingerprint(teacher=teacher, data={"n": 1}, preprocessing={"fn": len})


def build_model_copy(teacher):
    copy = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)
    copy.load_state_dict(teacher.state_dict())
    return copy


def test_open_with_another_runs_fingerprint_names_the_field(tmp_path, teacher, data):
    build(tmp_path, teacher, data, dtype="fp32", shard_size=128)
    assert SoftLabelCache.open(tmp_path, fingerprint=fp(teacher, data, dtype="fp32")).num_samples == 300
    with pytest.raises(CacheError, match=r"built for another run \(dtype: fp32 -> fp16; top_k: null -> 5; "
                                         r"cached -> this run\); rebuild it with `softkd cache build`"):
        SoftLabelCache.open(tmp_path, fingerprint=fp(teacher, data, dtype="fp16", top_k=5))
    with pytest.raises(CacheError, match=r"data\.n: 300 -> 299"):
        SoftLabelCache.open(tmp_path, fingerprint=fp(teacher, data.subset(torch.arange(299)), dtype="fp32"))


def test_build_refuses_a_fingerprint_that_does_not_describe_it(tmp_path, teacher, data):
    with pytest.raises(CacheError, match=r"does not describe this build \(dtype: fp16 -> fp32;"):
        SoftLabelCache.build(tmp_path, teacher, data, fingerprint=fp(teacher, data, dtype="fp16"), dtype="fp32")
    other = fp(teacher, data.subset(torch.arange(2, 300)), dtype="fp32")
    with pytest.raises(CacheError, match=r"data\.ids_sha256: .*data\.n: 298 -> 300"):
        SoftLabelCache.build(tmp_path, teacher, data, fingerprint=other, dtype="fp32")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Bad input and damaged caches
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"top_k": 11}, r"'top_k' of the soft-label cache must be <= the teacher's 10 classes; got 11"),
    ({"top_k": 0}, r"'top_k' of the soft-label cache must be an integer >= 1 \(or None"),
    ({"views": 0}, r"'views' of the soft-label cache must be an integer >= 1; got 0"),
    ({"views": 2}, r"views=2 needs a view_fn\(x, ids, view\)"),
    ({"dtype": "bf16"}, r"'dtype' of the soft-label cache must be one of fp16, fp32; got 'bf16'"),
])
def test_bad_options_raise_before_anything_is_written(tmp_path, teacher, data, options, message):
    with pytest.raises(CacheError, match=message):
        build(tmp_path / "cache", teacher, data, **options)
    assert not (tmp_path / "cache").exists()


def test_missing_or_edited_manifest(tmp_path, teacher, data):
    with pytest.raises(CacheError, match=r"manifest\.json is missing; build it with `softkd cache build`"):
        SoftLabelCache.open(tmp_path)
    build(tmp_path, teacher, data, shard_size=128)
    manifest = tmp_path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CacheError, match=r"manifest\.json' is not a valid soft-label cache manifest .*softkd cache build"):
        SoftLabelCache.open(tmp_path)
    edited = json.loads(good)
    edited["num_classes"] = 11
    manifest.write_text(json.dumps(edited))
    with pytest.raises(CacheError, match=r"shard-00000\.bin records 128 samples in 5120 bytes; expected 128 "
                                         r"samples of 44 bytes"):
        SoftLabelCache.open(tmp_path)


def test_missing_or_wrong_size_shard_is_named(tmp_path, teacher, data):
    build(tmp_path, teacher, data, shard_size=128)
    shard = tmp_path / "shard-00001.bin"
    with shard.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(CacheError, match=r"shard-00001\.bin' has 5121 bytes but the manifest records 5120"):
        SoftLabelCache.open(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.bin' of the soft-label cache is missing"):
        SoftLabelCache.open(tmp_path)


def test_verify_finds_a_flipped_byte_and_a_truncated_shard(tmp_path, teacher, data):
    cache = build(tmp_path, teacher, data, shard_size=128)
    cache.verify()
    shard = tmp_path / "shard-00002.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:7] + bytes([good[7] ^ 0x10]) + good[8:])
    opened = SoftLabelCache.open(tmp_path)  # same size: opening reads no shard
    with pytest.raises(CacheError, match=r"shard-00002\.bin' is corrupt: its sha256 differs"):
        opened.verify()
    shard.write_bytes(good[:-4])
    with pytest.raises(CacheError, match=r"shard-00002\.bin' has 1756 bytes"):
        cache.verify()


# ----------------------------------------------------------------------------------------------
# Interruption, resume, overwrite, memory
# ----------------------------------------------------------------------------------------------

class Counting(nn.Module):
    """Counts forward calls and how many earlier outputs are still alive at each call."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls, self.outputs, self.most_alive = module, 0, [], 0

    def forward(self, x):
        self.calls += 1
        self.most_alive = max(self.most_alive, sum(ref() is not None for ref in self.outputs))
        out = self.module(x)
        self.outputs.append(weakref.ref(out))
        return out


def stop_after(samples):
    def progress(done, total):
        if done >= samples:
            raise KeyboardInterrupt
    return progress


def test_interrupted_build_leaves_no_manifest_and_resumes(tmp_path, teacher, data):
    whole = Counting(teacher)
    build(tmp_path / "whole", whole, data, shard_size=128, batch_size=32)
    assert whole.calls == 1 + 10  # one probe, then 4 + 4 + 2 batches

    folder = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(folder, Counting(teacher), data, shard_size=128, batch_size=32, progress=stop_after(128))
    assert not (folder / "manifest.json").exists() and (folder / "shard-00000.bin").exists()
    with pytest.raises(CacheError, match=r"manifest\.json is missing \(an interrupted build: building again "
                                         r"resumes it\)"):
        SoftLabelCache.open(folder)

    again, seen = Counting(teacher), []
    cache = build(folder, again, data, shard_size=128, batch_size=32, progress=lambda d, t: seen.append(d))
    assert again.calls == 1 + 6  # shard 0 kept, not recomputed
    assert seen[0] == 128 and seen[-1] == 300
    assert shard_bytes(folder) == shard_bytes(tmp_path / "whole")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [f"shard-0000{i}.bin" for i in range(3)]
    cache.verify()


def test_a_complete_cache_is_replaced_only_with_overwrite(tmp_path, teacher, data):
    counting = Counting(teacher)  # the same wrapper throughout: it is part of the teacher's fingerprint
    build(tmp_path, counting, data, shard_size=128)
    with pytest.raises(CacheError, match=r"already holds a complete soft-label cache; .*overwrite=True"):
        build(tmp_path, counting, data, shard_size=128)
    # an interrupted replacement leaves the old cache whole and usable
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, counting, data, dtype="fp16", shard_size=100, overwrite=True, progress=stop_after(100))
    SoftLabelCache.open(tmp_path, fingerprint=fp(counting, data, dtype="fp32")).verify()

    counting.calls = 0
    cache = build(tmp_path, counting, data, dtype="fp16", shard_size=100, batch_size=50, overwrite=True)
    assert counting.calls == 1 + 4  # the staged first shard was kept
    assert cache.dtype == "fp16" and cache.info()["shards"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [f"shard-0000{i}.bin" for i in range(3)]
    SoftLabelCache.open(tmp_path, fingerprint=fp(counting, data, dtype="fp16")).verify()


def test_the_builder_never_holds_more_than_one_batch(tmp_path, wide):
    linear, data = wide
    counting = Counting(linear)
    build(tmp_path, counting, data, dtype="fp16", top_k=5, shard_size=64, batch_size=16)
    assert counting.calls == 1 + 4 * 4 + 3 and counting.most_alive == 0  # every earlier output freed


def _rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_memory_does_not_grow_with_the_number_of_samples(tmp_path, wide):
    linear, _ = wide
    growth = {}
    for n in (2_000, 20_000):  # all the fp32 logits of 20,000 samples would be 80 MB
        data = ArrayDataset(torch.randn(n, 8), name="random")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        build(tmp_path / str(n), linear, data, dtype="fp16", shard_size=4096, batch_size=512)
        growth[n] = _rss_kib("VmHWM") - before
    assert growth[20_000] < growth[2_000] + 16 * 1024, growth


def test_fp16_range_is_checked_on_the_logits_the_cache_stores(tmp_path, wide):
    # One logit far below fp16's range: a dense fp16 cache would store -inf, so it is refused; a
    # top-k cache stores only the k largest (the rest go into the float32 tail mass), so it builds.
    linear, data = wide
    deep = nn.Linear(8, 1000)
    with torch.no_grad():
        deep.weight.copy_(linear.weight)
        deep.bias.copy_(linear.bias)
        deep.bias[7] = -1e6
    with pytest.raises(CacheError, match=r"beyond fp16's ±65504; build the cache with dtype='fp32'"):
        build(tmp_path / "dense", deep, data, dtype="fp16")
    assert not (tmp_path / "dense" / "manifest.json").exists()
    cache = build(tmp_path / "top", deep, data, dtype="fp16", top_k=16)
    with torch.no_grad():
        top = deep(data.x).topk(16, dim=-1)
    rebuilt = cache.logits(torch.arange(len(data)))
    assert torch.allclose(rebuilt.gather(1, top.indices), top.values, rtol=1e-3, atol=1e-2)  # fp16 rounding
    assert torch.isfinite(rebuilt).all()


@pytest.mark.parametrize("setting, message", [
    ("cache.top_k=11", r"'cache.top_k' must be <= the data's 10 classes; got 11"),
    ("cache.views=0", r"'cache.views' in .* is invalid"),
])
def test_cache_build_refuses_bad_sizes_before_writing(tmp_path, setting, message):
    (tmp_path / "run.yaml").write_text("data: {name: digits}\nteacher: {model: mlp-8, epochs: 1}\n")
    from typer.testing import CliRunner

    from softkd.cli import app

    result = CliRunner().invoke(app, ["cache", "build", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"),
                                      "--set", setting])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run").exists()
