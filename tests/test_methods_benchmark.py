"""The methods benchmark's bookkeeping: per-student training times from metrics.jsonl (a stage
trained again counts its last try) and the docs table's order."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("methods_benchmark", ROOT / "benchmarks" / "methods.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _epoch(stage, fraction, seed, epoch, seconds):
    return {"stage": stage, "labeled_fraction": fraction, "seed": seed, "epoch": epoch, "epoch_s": seconds}


def test_stage_seconds_sum_epochs_per_student_and_count_a_retried_stage_once(tmp_path):
    records = [
        _epoch("scratch", 1.0, 0, 1, 10.0), _epoch("scratch", 1.0, 0, 2, 12.0),
        _epoch("distilled", 1.0, 0, 1, 99.0),  # a try stopped midway...
        {"stage": "distilled", "labeled_fraction": 1.0, "seed": 0, "kind": "step", "epoch": 1, "epoch_s": 5.0},
        _epoch("distilled", 1.0, 0, 1, 20.0), _epoch("distilled", 1.0, 0, 2, 22.0),  # ...and its rerun
        _epoch("scratch", 1.0, 1, 1, 14.0), _epoch("scratch", 1.0, 1, 2, 16.0),
        _epoch("scratch", 0.03, 0, 1, 3.0),
        dict(_epoch("scratch", 1.0, 0, 1, 7.0), student="peer1"),  # a cohort peer's own scratch twin
        {"stage": "teacher", "epoch": 1, "epoch_s": 50.0},  # a teacher trained in the run: not a student
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    seconds = bench.stage_seconds(path)
    assert seconds == {("scratch", 1.0, ""): (22.0 + 30.0) / 2, ("distilled", 1.0, ""): 42.0,
                       ("scratch", 0.03, ""): 3.0, ("scratch", 1.0, "peer1"): 7.0}


def _row(config, name, num_labeled, distilled):
    stats = lambda m: {"mean": m, "std": 0.001, "runs": [m]}  # noqa: E731
    return {"config": config, "student": "mlp-128", "regime": f"{num_labeled // 540}% labels",
            "num_labeled": num_labeled, "method": {"name": name, "formula": f"loss = {name}"},
            "teacher_accuracy": 0.93, "scratch": stats(0.88), "distilled": stats(distilled),
            "gap_recovered": (distilled - 0.88) / 0.05, "verdict": "distillation helped: +1.0 points",
            "ece": {"scratch": 0.02, "distilled": 0.01}, "train_s_per_student": {"scratch": 60.0, "distilled": 90.0}}


def test_table_orders_by_regime_then_method_and_shows_each_figure(tmp_path):
    results = tmp_path / "methods.json"
    results.write_text(json.dumps([_row("b", "dkd", 1620, 0.86), _row("a", "dkd", 54000, 0.89),
                                   _row("c", "soft-target", 54000, 0.875)]))
    lines = bench.table(results).splitlines()
    assert [line.split(" | ")[1:3] for line in lines[2:]] == [
        ["100%", "`soft-target`"], ["100%", "`dkd`"], ["3%", "`dkd`"]]
    assert lines[3] == ("| mlp-128 | 100% | `dkd` | dkd | 93.0 | 88.0 ± 0.1 | 89.0 ± 0.1 | +1.0 | 20 % "
                        "| 0.020 → 0.010 | distillation helped | 1.0 / 1.5 |")


def test_a_run_without_a_teacher_gives_rows_for_every_peer(tmp_path):
    stats = {"mean": 0.9, "std": 0.01, "runs": [0.9]}
    regime = {"labeled_fraction": 1.0, "num_labeled": 100, "scratch": {"accuracy": stats, "ece": {"mean": 0.02}},
              "distilled": {"accuracy": stats, "ece": {"mean": 0.01}}, "verdict": "no clear difference"}
    report = {"students": {"peer0": {"model": "tinycnn-16", "params": 10, "regimes": {"100% labels": regime}},
                           "peer1": {"model": "mlp-128", "params": 20, "regimes": {"100% labels": regime}}},
              "method": {"name": "mutual", "formula": "loss = mutual"}, "versions": {"softkd": "0.3.0", "torch": "x"},
              "hardware": {"device": "cpu"}}
    rows = bench.rows("m", report, 60.0, {("scratch", 1.0, "peer1"): 30.0, ("distilled", 1.0, ""): 90.0})
    assert [r["student"] for r in rows] == ["peer0 (tinycnn-16)", "peer1 (mlp-128)"]
    assert rows[0]["teacher"] is None and rows[0]["gap_recovered"] is None
    assert rows[1]["train_s_per_student"] == {"scratch": 30.0, "distilled": 90.0}
    results = tmp_path / "methods.json"
    results.write_text(json.dumps(rows))
    assert "| peer1 (mlp-128) | 100% | `mutual` | mutual | – | 90.0 ± 1.0 |" in bench.table(results)


def test_stage_validation_takes_each_students_value_at_its_best_epoch(tmp_path):
    def val(stage, epoch, accuracy, seed=0, **extra):
        return {"stage": stage, "labeled_fraction": 1.0, "seed": seed, "epoch": epoch, "val_accuracy": accuracy,
                **extra}

    records = [
        val("scratch", 1, 0.80), val("scratch", 2, 0.85), val("scratch", 3, 0.84),
        val("scratch", 1, 0.70, seed=1), val("scratch", 2, 0.75, seed=1),
        # a cohort: the mean picks epoch 2 for both peers, though peer1 was better at epoch 1
        val("distilled", 1, 0.80, val_peer0_accuracy=0.70, val_peer1_accuracy=0.90),
        val("distilled", 2, 0.86, val_peer0_accuracy=0.88, val_peer1_accuracy=0.84),
        {"stage": "distilled", "labeled_fraction": 1.0, "seed": 0, "kind": "step", "epoch": 2, "val_accuracy": 1.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    found = bench.stage_validation(path)
    assert found == {("scratch", 1.0, ""): (0.85 + 0.75) / 2, ("distilled", 1.0, "peer0"): 0.88,
                     ("distilled", 1.0, "peer1"): 0.84}
