"""Data parallelism over torch.distributed (gloo on CPU): 2 processes train like 1 on the same
global batch. Runs real processes through torchrun."""

import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = r"""
import json, os, sys, torch, softkd
from softkd.data.augment import build_augment
from softkd.data.datasets import digits
from softkd.methods import SoftTarget
from softkd.models import build_model
from softkd.models.weights import save_weights
from softkd.train.distributed import Distributed
torch.set_num_threads(1)
out, cases = sys.argv[1], json.loads(sys.argv[2])
splits = digits()
rank = int(os.environ.get("RANK", "0"))
assert Distributed().rank == rank and Distributed().world == int(os.environ.get("WORLD_SIZE", "1"))
for case, (accumulate, optimizer, max_steps, n, augment) in enumerate(cases):  # one launch trains every case
    x, y = splits.train.x[:n], splits.train.y[:n].clone()
    y[::3] = -1
    y[:50] = -1                                   # labeled and unlabeled samples spread unevenly
    torch.manual_seed(0)
    teacher = build_model("mlp-64", input_shape=(1, 8, 8), num_classes=10)
    torch.manual_seed(1)
    student = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
    records, data = [], softkd.ArrayDataset(x, y)
    augment = build_augment(augment, seed=1, pool=data)  # mixup: partners from the whole set on every process
    softkd.fit(student, data, objective=SoftTarget(teacher=teacher, temperature=3.0, beta=0.6), augment=augment,
               val_data=splits.val, batch_size=128, accumulate=accumulate, max_steps=max_steps, epochs=2,
               optimizer=optimizer, lr=0.05, momentum=0.0, weight_decay=1e-2, log=records.append)
    if rank == 0:
        save_weights(student, f"{out}/weights-{case}.safetensors")
    json.dump(records, open(f"{out}/log-{rank}-{case}.json", "w"))
"""

# (accumulate on 2 processes, optimizer, max_steps, samples, data.augment). 416 samples: each
# epoch's last step is one micro-batch of 32, so process 1 has none (it runs a zero-weight backward
# pass for DDP's all-reduce, which must change nothing). With mixup the label mass of each
# micro-batch differs from its labeled count; its case takes SGD, because Adam's division by the
# root of tiny second moments magnifies float rounding: there 2 processes and 1 part by 3e-6 after
# 8 steps, where SGD keeps them within 1e-8.
CASES = [(1, "sgd", 1, 512, None), (2, "adamw", 8, 512, None), (2, "adamw", 8, 416, None), (2, "sgd", 8, 416, "mixup")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every case trained on 1 process and on 2, in one launch each (a launch costs seconds)."""
    root = tmp_path_factory.mktemp("like-one")
    for processes in (1, 2):
        folder = root / str(processes)
        folder.mkdir()
        (folder / "train.py").write_text(SCRIPT)
        cases = [[accumulate if processes == 2 else 1, *rest] for accumulate, *rest in CASES]
        _launch([str(folder / "train.py"), str(folder), json.dumps(cases)], processes=processes, cwd=folder)
    return root


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_two_processes_train_like_one_on_the_same_global_batch(trained, case):
    one, two = (load_file(trained / p / f"weights-{case}.safetensors") for p in ("1", "2"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # metrics are reduced over processes, and only rank 0 logs
    assert not (trained / "2" / f"log-1-{case}.json").read_text().strip("[]")
    logged = {p: json.loads((trained / p / f"log-0-{case}.json").read_text()) for p in ("1", "2")}
    assert len(logged["1"]) == len(logged["2"]) > 0
    for a, b in zip(logged["1"], logged["2"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])


# Every multi-process job runs under this probe. Registered before softkd is imported, its atexit
# hook runs after softkd's teardown, while the interpreter still runs; it records the threads
# left. Gloo's worker threads alive then are what aborted finished runs ("terminate called
# without an active exception", SIGABRT): they released their last work during interpreter
# finalization (softkd.train.distributed).
EXIT_PROBE = r"""
import atexit, json, os, runpy, sys


def record():
    tasks = f"/proc/{os.getpid()}/task"
    names = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
    with open(os.path.join(os.environ["EXIT_PROBE_DIR"], f"exit-{os.environ['RANK']}.json"), "w") as f:
        json.dump(names, f)


atexit.register(record)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def _launch(args, *, processes, cwd, wait=True, timeout=600, exit_code=0):
    """``python -m softkd.cli ARGS`` (or a script) on ``processes`` torchrun processes. A finished
    run must exit with ``exit_code`` and, on each process that exited by itself, leave no gloo
    thread alive when the interpreter begins to finalize. No process may abort (-6)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    probes = Path(cwd) / f"exit-probe-{next(_LAUNCHES)}"
    if processes > 1 and wait:
        probes.mkdir()
        (probes / "probe.py").write_text(EXIT_PROBE)
        args = [str(probes / "probe.py"), *args]
        env["EXIT_PROBE_DIR"] = str(probes)
    head = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = head + args
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if processes == 1:
        assert proc.returncode == exit_code, proc.stderr[-3000:]
        return proc
    # torchrun exits 0 only when every process did. Otherwise it lists the failed processes with
    # their exit codes, the first to exit as the root cause, and it SIGTERMs (-15) those still
    # running then: with a shared error every process stops at once, and one that is still
    # printing or exiting may be among them. No process may abort with SIGABRT (-6).
    codes = [int(c) for c in re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)]
    if exit_code == 0:
        assert proc.returncode == 0 and not codes, proc.stderr[-3000:]
    else:
        root = re.search(r"Root Cause.*?exitcode\s*: (-?\d+)", proc.stderr, re.S)
        assert proc.returncode != 0 and root and int(root.group(1)) == exit_code, proc.stderr[-3000:]
        assert set(codes) <= {exit_code, -15}, proc.stderr[-3000:]
    exited = [rank for rank in range(processes) if (probes / f"exit-{rank}.json").exists()]
    assert len(exited) == processes or exit_code != 0, proc.stderr[-3000:]
    for rank in exited:
        left = json.loads((probes / f"exit-{rank}.json").read_text())
        assert not [name for name in left if name in GLOO_THREADS], f"process {rank} at exit: {left}"
    return proc


_LAUNCHES = itertools.count()


RUN_CONFIG = """
data:    {name: digits, val_fraction: 0.1, labeled_fraction: [1.0, 0.1], seed: 0}
teacher: {model: mlp-32, epochs: 3, lr: 3.0e-3, batch_size: 64}
student: {model: mlp-16}
method:  {name: soft-target, temperature: 4.0, beta: 0.9}
train:   {epochs: 3, batch_size: 64, lr: 3.0e-3, seeds: [0], threads: 1}
cache:   {shard_size: 256}
"""


def test_softkd_run_under_torchrun_trains_like_one_process_and_writes_once(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN_CONFIG)
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        proc = _launch(["-m", "softkd.cli", "run", "run.yaml", "--out", out.name], processes=processes, cwd=tmp_path)
        assert proc.stdout.count("Run directory:") == 1  # one process reports
        reports[processes] = json.loads((out / "report.json").read_text())
    one, two = (reports[p]["students"]["mlp-16"]["regimes"] for p in (1, 2))
    assert one.keys() == two.keys() and len(one) == 2
    for regime in one:
        for kind in ("scratch", "distilled"):
            assert two[regime][kind]["accuracy"]["mean"] == pytest.approx(one[regime][kind]["accuracy"]["mean"],
                                                                          abs=1.5 / 359)
    assert reports[2]["teacher"]["accuracy"] == pytest.approx(reports[1]["teacher"]["accuracy"], abs=1.5 / 359)
    # every record once (the teacher's 3 epochs, 4 students × 3 epochs), from the main process only
    records = {p: [json.loads(line) for line in (tmp_path / f"p{p}" / "metrics.jsonl").read_text().splitlines()]
               for p in (1, 2)}
    assert [r.get("kind", "epoch") for r in records[2]] == [r.get("kind", "epoch") for r in records[1]]
    assert sum(r.get("kind") != "step" for r in records[2]) == 3 + 4 * 3
    # the cache was built in 6 shards split across the processes (a teacher trained on 2 processes
    # differs from 1 process's in the last bits, so bytes are compared in the next test)
    assert len(list((tmp_path / "p2" / "cache").glob("shard-*.bin"))) == 6
    assert not list((tmp_path / "p2" / "cache").glob("progress*.json"))


def test_cache_build_under_torchrun_is_byte_identical_to_one_process(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN_CONFIG.replace("teacher: {", "teacher: {checkpoint: teacher.safetensors, "))
    torch.manual_seed(0)
    from softkd.models import build_model
    from softkd.models.weights import save_weights

    save_weights(build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10), tmp_path / "teacher.safetensors")
    manifests = {}
    for processes in (1, 2):
        _launch(["-m", "softkd.cli", "cache", "build", "run.yaml", "--out", f"p{processes}"], processes=processes,
                cwd=tmp_path)
        manifests[processes] = json.loads((tmp_path / f"p{processes}" / "cache" / "manifest.json").read_text())
        manifests[processes].pop("created")
    assert manifests[1] == manifests[2]  # same shards, same sha256s: everything but the creation time
    for entry in manifests[1]["shards"]:
        assert (tmp_path / "p1" / "cache" / entry["file"]).read_bytes() == \
            (tmp_path / "p2" / "cache" / entry["file"]).read_bytes()


RESUME_SCRIPT = r"""
import sys, time, torch, softkd
from softkd.data.datasets import digits
from softkd.models import build_model
from softkd.models.weights import save_weights
from softkd.train.distributed import Distributed
torch.set_num_threads(1)
out, resume, slow = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
splits = digits()
torch.manual_seed(0)
model = build_model("hinton-mlp-64", input_shape=(1, 8, 8), num_classes=10)   # dropout: every process's RNG matters
softkd.fit(model, splits.train, val_data=splits.val, epochs=3, batch_size=96, accumulate=2, lr=3e-3,
           lr_schedule="cosine", checkpoint_dir=out + "/ckpt", checkpoint_every=4, resume=resume,
           on_step=lambda step: time.sleep(slow))
if Distributed().is_main:
    save_weights(model, out + "/final.safetensors")
"""


def _kill_tree(pid):
    """SIGKILL ``pid`` and all its descendants, found through /proc, children first."""
    import signal
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [pid]
    while queue:
        tree.append(queue.pop())
        queue += parents.get(tree[-1], [])
    for member in reversed(tree):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_process_run_killed_and_resumed_gives_the_same_weights_bit_for_bit(tmp_path):
    import random
    import time

    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    for name in ("clean", "killed"):
        (tmp_path / name).mkdir()
    victim = _launch([str(script), str(tmp_path / "killed"), "0", "0.05"], processes=2, cwd=tmp_path, wait=False)
    # the uninterrupted run trains meanwhile (the victim mostly sleeps between its steps)
    clean = ThreadPoolExecutor(1).submit(_launch, [str(script), str(tmp_path / "clean"), "0", "0"], processes=2,
                                         cwd=tmp_path)
    ckpt = tmp_path / "killed" / "ckpt"
    deadline = time.time() + 120
    # Past the first epoch (14 steps), where the processes' RNG states have parted: the last
    # micro-batch groups give them different numbers of samples, so different dropout draws.
    while not [p for p in ckpt.glob("ckpt-*.pt") if int(p.stem[5:]) > 14] and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))  # then a random step
    _kill_tree(victim.pid)  # torchrun and both workers (which torchrun starts in sessions of their own)
    victim.wait()
    assert not (tmp_path / "killed" / "final.safetensors").exists(), "killed too late: the run had finished"
    saved = torch.load(sorted(ckpt.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert len(saved["rng"]) == 2  # one RNG state per process
    _launch([str(script), str(tmp_path / "killed"), "1", "0"], processes=2, cwd=tmp_path)
    clean.result()  # its assertions (exit code, exit probe) too
    a, b = (load_file(tmp_path / name / "final.safetensors") for name in ("clean", "killed"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_softkd_teacher_under_torchrun_writes_once_and_reports_once(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN_CONFIG)
    proc = _launch(["-m", "softkd.cli", "teacher", "run.yaml", "--out", "t"], processes=2, cwd=tmp_path)
    assert proc.stdout.count("Teacher mlp-32") == 1
    stamp = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert stamp["result"]["test"]["accuracy"] > 0.5
    assert (tmp_path / "t" / "teacher.safetensors").is_file() and not (tmp_path / "t" / "teacher.ckpt").exists()
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("kind") != "step" for r in records) == 3


FAILING_SCRIPT = r"""
import json, os, sys, torch, softkd
from torch import nn
from softkd.data.datasets import digits
from softkd.errors import SoftKDError
torch.set_num_threads(1)
out = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
splits = digits()


class Poisoned(nn.Module):
    # NaN outputs from the 5th training forward pass on, on process 1 only (the cache build: on
    # the inputs marked with 99, which lie in process 1's shard only).
    def __init__(self, what):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.calls, self.what = 0, what

    def forward(self, x):
        out = self.net(x)
        if self.what == "cache":
            return torch.where((x.flatten(1).amax(1) > 98)[:, None], torch.full_like(out, float("nan")), out)
        self.calls += self.training
        return out * float("nan") if rank == 1 and self.calls >= 5 else out


for what in ("cache", "train"):  # one launch, two failures: after a shared error the group goes on
    try:
        if what == "cache":
            x = splits.train.x.clone()
            x[300] = 99.0  # shard 1 of 256-sample shards: process 1's
            data = softkd.ArrayDataset(x, splits.train.y, num_classes=10)
            softkd.SoftLabelCache.build(out + "/cache", Poisoned(what), data, fingerprint={"test": 1},
                                        shard_size=256)
        else:
            softkd.fit(Poisoned(what), splits.train, epochs=2, batch_size=64, checkpoint_dir=out + "/ckpt",
                       checkpoint_every=3)
        result = "finished"
    except SoftKDError as exc:
        result = f"{type(exc).__name__} shared={getattr(exc, 'shared', False)}: {exc}"
    json.dump(result, open(f"{out}/result-{what}-{rank}.json", "w"))
"""


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    root = tmp_path_factory.mktemp("failing")
    (root / "fail.py").write_text(FAILING_SCRIPT)
    _launch([str(root / "fail.py"), str(root)], processes=2, cwd=root, timeout=180)
    return root


@pytest.mark.parametrize("what", ["cache", "train"])
def test_an_error_on_one_process_stops_every_process_with_the_same_message(failed, what):
    # Without this, the other process goes on to its next collective and dies there with gloo's
    # 'Connection closed by peer' when the failing one exits (seen: the test then fails here).
    results = [json.loads((failed / f"result-{what}-{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1], results
    if what == "cache":
        assert results[0].startswith("CacheError shared=True: The teacher gave non-finite logits for samples 256..")
        assert not (failed / "cache" / "manifest.json").exists()  # no cache that opens as complete
    else:
        assert results[0].startswith("TrainingError shared=True: The training loss became non-finite at step 5 "
                                     "(term(s): ce)")
        saved = sorted(p.name for p in (failed / "ckpt").glob("ckpt-*.pt"))
        assert saved == ["ckpt-00000003.pt"]
        state = torch.load(failed / "ckpt" / saved[0], weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


OWN_GROUP_SCRIPT = r"""
import atexit, json, os, sys, torch


def after_softkd():  # registered first, so it runs after softkd's own exit hook
    json.dump({"alive_after_softkd_exit_hook": torch.distributed.is_initialized()}, open(sys.argv[1], "w"))
    torch.distributed.destroy_process_group()


atexit.register(after_softkd)
import softkd
from softkd.data.datasets import digits
from softkd.models import build_model
torch.set_num_threads(1)
torch.distributed.init_process_group("gloo")   # the script's own group: softkd uses it, and leaves it
group = torch.distributed.group.WORLD
splits = digits()
torch.manual_seed(0)
teacher = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
softkd.fit(teacher, splits.train, epochs=1, batch_size=64)
student = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)
softkd.distill(student, teacher, splits.train, epochs=1, batch_size=64)
assert torch.distributed.group.WORLD is group
del group  # the script's last reference: destroy_process_group() then frees the group
"""


def test_a_process_group_the_script_created_is_used_and_left_to_it(tmp_path):
    (tmp_path / "own.py").write_text(OWN_GROUP_SCRIPT)
    _launch([str(tmp_path / "own.py"), str(tmp_path / "state.json")], processes=2, cwd=tmp_path, timeout=180)
    assert json.loads((tmp_path / "state.json").read_text()) == {"alive_after_softkd_exit_hook": True}


def test_softkd_teacher_under_torchrun_stopped_by_a_bad_value_exits_2_with_one_line(tmp_path):
    # A learning rate that makes the loss non-finite: every process stops at the same step, the
    # main process prints one line, and the processes exit with 2 (not -6 after the message).
    (tmp_path / "run.yaml").write_text(RUN_CONFIG)
    proc = _launch(["-m", "softkd.cli", "teacher", "run.yaml", "--out", "t", "--set", "teacher.lr=1e30"],
                   processes=2, cwd=tmp_path, exit_code=2, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "The training loss became non-finite at step" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "t" / "teacher.safetensors").exists()


METHODS_SCRIPT = r"""
import os, sys, torch, softkd
from torch import nn
from safetensors.torch import save_file
from softkd.data.datasets import digits
from softkd.methods import Method
from softkd.models import build_model
torch.set_num_threads(1)


class LearnedBias(Method):  # a trainable part, sized by a dry forward (as adapters are)
    name, terms = "learned-bias", ("loss", "ce")

    def setup(self, model, batch):
        self.parts = nn.Linear(10, 10)

    def forward(self, model, batch, *, labeled_count=None, sample_count=None):
        ce = softkd.losses.cross_entropy(self.run_parts(model(batch["x"])), batch["y"], count=labeled_count)
        return {"loss": ce, "ce": ce.detach()}


out, accumulate = sys.argv[1], int(sys.argv[2])
splits = digits()
for method in ("parts", "mutual", "feature"):  # one launch trains every method
    x, y = splits.train.x[:416], splits.train.y[:416].clone()
    if method != "parts":
        y[::3] = -1  # unlabeled samples: taught by the peers (mutual) or the teacher (feature) only
    torch.manual_seed(0)
    teacher = build_model("mlp-64", input_shape=(1, 8, 8), num_classes=10)
    torch.manual_seed(1)
    student = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)  # no batch norm: exact
    if method == "parts":
        objective = LearnedBias()
    elif method == "feature":
        objective = softkd.build_method("feature", teachers=[softkd.Teacher(teacher)], student_layers=["2"],
                                        teacher_layers=["2"])  # hints through a linear adapter
    else:
        objective = softkd.build_method("mutual")
    result = softkd.fit(student, softkd.ArrayDataset(x, y), objective=objective, epochs=2, batch_size=128,
                        accumulate=accumulate, optimizer="adamw", lr=0.01)
    if int(os.environ.get("RANK", "0")) == 0:
        modules = dict(result.students, **({"parts": objective.parts} if method != "mutual" else {}))
        save_file({f"{name or 'student'}.{k}": v.contiguous() for name, m in modules.items()
                   for k, v in m.state_dict().items()}, f"{out}/{method}.safetensors")
"""


@pytest.fixture(scope="module")
def methods_trained(tmp_path_factory):
    """Each method trained on 1 process and on 2 (with 2 micro-batches), one launch each."""
    root = tmp_path_factory.mktemp("methods")
    (root / "methods.py").write_text(METHODS_SCRIPT)
    for processes, accumulate in ((1, 1), (2, 2)):
        (root / str(processes)).mkdir()
        _launch([str(root / "methods.py"), str(root / str(processes)), str(accumulate)], processes=processes,
                cwd=root)
    return root


@pytest.mark.parametrize("method, parts", [("parts", {"student", "parts"}), ("mutual", {"peer0", "peer1"}),
                                           ("feature", {"student", "parts"})])
def test_a_methods_trainable_parts_and_both_families_train_through_ddp_like_one_process(methods_trained, method,
                                                                                        parts):
    one, two = (load_file(methods_trained / p / f"{method}.safetensors") for p in ("1", "2"))
    assert {k.split(".")[0] for k in one} == parts
    if method == "parts":
        assert {k for k in one if k.startswith("parts.")} == {"parts.weight", "parts.bias"}
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
