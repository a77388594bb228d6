"""Data parallelism over torch.distributed (gloo on CPU): 2 processes train like 1 on the same
global batch. Runs real processes through torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = r"""
import json, os, sys, torch, softkd
from softkd.data.datasets import digits
from softkd.methods import SoftTarget
from softkd.models import build_model
from softkd.models.checkpoint import save_weights
torch.set_num_threads(1)
out, accumulate, optimizer, max_steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
splits = digits()
x, y = splits.train.x[:512], splits.train.y[:512].clone()
y[::3] = -1
y[:50] = -1                                   # labeled and unlabeled samples spread unevenly
torch.manual_seed(0)
teacher = build_model("mlp-64", input_shape=(1, 8, 8), num_classes=10)
torch.manual_seed(1)
student = build_model("mlp-32", input_shape=(1, 8, 8), num_classes=10)
records = []
softkd.fit(student, softkd.ArrayDataset(x, y), objective=SoftTarget(teacher=teacher, temperature=3.0, beta=0.6),
           val_data=splits.val, batch_size=128, accumulate=accumulate, max_steps=max_steps, epochs=2,
           optimizer=optimizer, lr=0.05, momentum=0.0, weight_decay=1e-2, log=records.append)
from softkd.train.runtime import Distributed
rank = int(os.environ.get("RANK", "0"))
assert Distributed().rank == rank and Distributed().world == int(os.environ.get("WORLD_SIZE", "1"))
if rank == 0:
    save_weights(student, out + "/weights.safetensors")
json.dump(records, open(f"{out}/log-{rank}.json", "w"))
"""


def _train(folder, *, processes, accumulate=1, optimizer="sgd", max_steps=1):
    folder.mkdir()
    script = folder / "train.py"
    script.write_text(SCRIPT)
    args = [str(folder), str(accumulate), optimizer, str(max_steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, str(script), *args]
        env.pop("WORLD_SIZE", None)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(folder / "weights.safetensors")


@pytest.mark.parametrize("accumulate, optimizer, max_steps", [(1, "sgd", 1), (2, "adamw", 8)])
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, accumulate, optimizer, max_steps):
    one = _train(tmp_path / "one", processes=1, optimizer=optimizer, max_steps=max_steps)
    two = _train(tmp_path / "two", processes=2, accumulate=accumulate, optimizer=optimizer, max_steps=max_steps)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # metrics are reduced over processes, and only rank 0 logs
    assert not (tmp_path / "two" / "log-1.json").read_text().strip("[]")
    logged = {p: json.loads((tmp_path / p / "log-0.json").read_text()) for p in ("one", "two")}
    for a, b in zip(logged["one"], logged["two"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
