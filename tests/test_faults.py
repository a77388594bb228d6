"""kill -9 in the middle of a write: of a training checkpoint, of the trained weights, of a cache
shard, of an export. Each command runs in its own process, which a real SIGKILL stops at the
moment the file is on disk under its temporary name (or half-written there) and not yet renamed
into place. Running the command again loses nothing: the resumed training ends on the same weights
bit for bit, the rebuilt cache verifies and equals one built without a stop, the export is whole —
and no temporary file is left behind.

(kill -9 at a random step of training is tests/test_engine.py and tests/test_distributed.py; a
full disk at write time is tests/test_cli.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Runs the softkd command line in this process, but SIGKILLs it when it is about to rename a
# finished temporary file onto the name given (the n-th such rename), after optionally cutting the
# temporary file to half its size: a crash between the write and the rename, or in the write.
KILLER = r"""
import os, re, signal, sys
pattern, nth, torn = re.compile(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "torn"
real_replace, seen = os.replace, [0]

def replace(src, dst, *args, **kwargs):
    if pattern.fullmatch(os.path.basename(os.fspath(dst))):
        seen[0] += 1
        if seen[0] == nth:
            if torn:
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
sys.argv = ["softkd"] + sys.argv[4:]
from softkd.cli import main
sys.exit(main())
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", SOFTKD_DEBUG="1")


def softkd(*args, kill=None, nth=1, torn=False):
    """``softkd ARGS`` in a new process; ``kill``: the file name (a regex) whose rename kills it."""
    argv = [sys.executable, "-c", KILLER, kill or "(?!)", str(nth), "torn" if torn else "whole"]
    return subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=300)


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def assert_killed(result):
    assert result.returncode == -9, (result.returncode, result.stderr[-2000:])


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-2000:]


def same_tensors(a: Path, b: Path):
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def test_a_training_killed_again_and_again_while_writing_resumes_to_the_same_weights(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {model: hinton-mlp-64, epochs: 3, batch_size: 128}\ntrain: {checkpoint_every: 4}\n")
    assert_ok(softkd("teacher", config, "--out", tmp_path / "clean"))
    out, left = tmp_path / "run", []
    # The second checkpoint fully written and not yet renamed; the same one again, half-written, in
    # the resumed run; then the trained weights, after the last checkpoint.
    for name, torn, resume in ((r"ckpt-00000008\.pt", False, ()), (r"ckpt-00000008\.pt", True, ("--resume",)),
                               (r"teacher\.safetensors", False, ("--resume",))):
        assert_killed(softkd("teacher", config, "--out", out, *resume, kill=name, torn=torn))
        assert not (out / "teacher.safetensors").exists()
        left.append(temporaries(out))
        assert len(left[-1]) == 1, left  # its own; the one the last kill left went with the next write
    assert sorted(p.name for p in (out / "teacher.ckpt").glob("ckpt-*.pt"))[-1] > "ckpt-00000008.pt"

    assert_ok(softkd("teacher", config, "--out", out, "--resume"))
    same_tensors(out / "teacher.safetensors", tmp_path / "clean" / "teacher.safetensors")
    assert temporaries(out) == []


def test_a_cache_build_killed_while_writing_a_shard_resumes_and_verifies(tmp_path):
    from softkd.models import build_model
    from softkd.models.weights import save_weights

    torch.manual_seed(0)
    save_weights(build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10), tmp_path / "teacher.safetensors")
    for name in ("clean", "killed"):  # the same teacher for both caches
        (tmp_path / f"{name}.yaml").write_text(
            f"teacher: {{model: mlp-32, checkpoint: {tmp_path / 'teacher.safetensors'}}}\n"
            f"cache: {{dir: {tmp_path / name}, dtype: fp32, shard_size: 256}}\n"
            f"output: {{dir: {tmp_path / (name + '-run')}}}\n")
    assert_ok(softkd("cache", "build", tmp_path / "clean.yaml"))

    assert_killed(softkd("cache", "build", tmp_path / "killed.yaml", kill=r"shard-00002\.bin", torn=True))
    killed = tmp_path / "killed"
    assert not (killed / "manifest.json").exists() and (killed / "shard-00001.bin").exists()
    assert temporaries(killed)
    assert_ok(softkd("cache", "build", tmp_path / "killed.yaml"))
    verified = softkd("cache", "verify", killed)
    assert_ok(verified)
    assert "OK" in verified.stdout
    shards = sorted(p.name for p in (tmp_path / "clean").glob("shard-*"))
    assert len(shards) >= 4 and sorted(p.name for p in killed.glob("shard-*")) == shards
    for shard in shards:
        assert (killed / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes(), shard
    assert temporaries(killed) == []


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("student")
    (folder / "c.yaml").write_text("teacher: {model: mlp-32, epochs: 1}\nstudent: {model: mlp-16}\n"
                                   f"train: {{epochs: 1, seeds: [0]}}\noutput: {{dir: {folder / 'run'}}}\n")
    assert_ok(softkd("run", folder / "c.yaml"))
    return folder / "run"


def test_an_export_killed_while_writing_leaves_no_partial_file_and_runs_again(student_run, tmp_path):
    out = tmp_path / "export"
    for torn in (False, True):  # written whole and not yet renamed; half-written
        assert_killed(softkd("export", student_run, "--out", out / "student.onnx", kill=r"student\.onnx", torn=torn))
        assert not (out / "student.onnx").exists() and not (out / "student.onnx.json").exists()
        assert len(temporaries(out)) == 1, "the kill came before anything was written, or left more than its own"

    assert_ok(softkd("export", student_run, "--out", out / "student.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["student.onnx", "student.onnx.json"]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: torch.zeros(3, 1, 8, 8).numpy()})
    assert logits.shape == (3, 10)
