"""benchmarks/quality.py on a tiny digits matrix: the teacher trained when missing, cells written
one by one and never run twice, a partial run continued later, the table from the JSON."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from softkd.config import config_from_dict, load_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _quality(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_matrix_runs_cell_by_cell_continues_later_and_renders_its_table(tmp_path):
    (tmp_path / "teacher.yaml").write_text("teacher: {model: tinycnn-8, epochs: 2, batch_size: 128}\n")
    matrix = {
        "seeds": [0, 1], "regimes": {"all": 1.0, "10%": 0.1},
        "base": {"data": {"name": "digits"}, "train": {"epochs": 2, "batch_size": 64, "threads": 1},
                 "output": {"latency": False}},
        "teachers": {"small": {"model": "tinycnn-8", "folder": str(tmp_path / "teacher"),
                               "config": str(tmp_path / "teacher.yaml")}},
        "students": {"mlp-16": {"teacher": "small",
                                "recipe": {"method": {"name": "soft-target", "temperature": 2.0, "beta": 0.5}}}},
        "methods": {"soft-target": {"method": {"name": "soft-target"}},
                    "auto": {"method": {"name": "auto", "grid": {"temperature": [2, 4]}}}},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    paths = ["--matrix", tmp_path / "m.yaml", "--results", tmp_path / "q.json"]
    assert _quality("plan", *paths).splitlines()[-1] == "0 of 12 cells done"

    first = _quality("run", *paths, "--out", tmp_path / "runs", "--only", "/10%/", "--only", "/0")
    assert (tmp_path / "teacher" / "teacher.safetensors").is_file()  # trained first: it was missing
    assert [line.split(":")[0] for line in first.splitlines() if line.startswith("mlp-16")] == [
        "mlp-16/10%/soft-target/0", "mlp-16/10%/auto/0", "mlp-16/10%/recipe/0"]
    saved = json.loads((tmp_path / "q.json").read_text())["cells"]
    assert sorted(c["name"] for c in saved) == ["mlp-16/10%/auto/0", "mlp-16/10%/recipe/0", "mlp-16/10%/soft-target/0"]
    by_name = {c["name"]: c for c in saved}
    assert by_name["mlp-16/10%/recipe/0"]["settings"]["temperature"] == 2.0
    assert by_name["mlp-16/10%/auto/0"]["chosen"] in {"scratch", "soft-target-temperature2", "soft-target-temperature4"}
    twin = by_name["mlp-16/10%/soft-target/0"]["twin"]  # the scratch student its run trained beside it
    stamp = json.loads((tmp_path / "runs" / "mlp-16-10pct" / "students" / "scratch-labels0.1-seed0.json").read_text())
    assert twin["accuracy"] == stamp["result"]["accuracy"] and 0.1 < twin["accuracy"] <= 1 and twin["train_s"] > 0
    assert by_name["mlp-16/10%/auto/0"]["twin"] == twin  # soft-target and auto share the folder's scratch student
    # each cell's distilled student and report are kept: the next method's run rewrote the folder's own
    folder = tmp_path / "runs" / "mlp-16-10pct"
    for method in ("soft-target", "auto", "recipe"):
        kept = folder / "cells" / f"{method}-seed0"
        stamp = json.loads((kept / "distilled-labels0.1-seed0.json").read_text())["result"]
        assert stamp["accuracy"] == by_name[f"mlp-16/10%/{method}/0"]["accuracy"]
        assert json.loads((kept / "report.json").read_text())["method"] == by_name[f"mlp-16/10%/{method}/0"]["settings"]
        assert (kept / "distilled-labels0.1-seed0.safetensors").is_file() and (kept / "report.md").is_file()
        assert not list(kept.glob("*.partial"))
    assert (json.loads((folder / "report.json").read_text())["method"]
            == by_name["mlp-16/10%/recipe/0"]["settings"] != by_name["mlp-16/10%/soft-target/0"]["settings"])

    again = _quality("run", *paths, "--out", tmp_path / "runs", "--only", "/10%/", "--only", "/0")
    assert again == ""  # every selected cell is done: nothing runs twice
    _quality("run", *paths, "--out", tmp_path / "runs", "--only", "/10%/soft-target/")  # seed 1, later
    assert _quality("plan", *paths).splitlines()[-1] == "4 of 12 cells done"

    rows = {line.split(" | ")[2] + " " + line.split(" | ")[1]: line
            for line in _quality("table", *paths).splitlines() if line.startswith("| mlp-16")}
    assert len(rows) == 6  # 2 regimes x (soft-target, auto, recipe)
    assert all("not run yet" in r for key, r in rows.items() if key.endswith(" all"))
    assert "| 2 |" in rows["soft-target 10%"] and "| 1 |" in rows["auto 10%"] and "| 1 |" in rows["recipe 10%"]
    cells = {c["name"]: c for c in json.loads((tmp_path / "q.json").read_text())["cells"]}
    scratch = [cells[f"mlp-16/10%/soft-target/{s}"]["twin"]["accuracy"] for s in (0, 1)]
    distilled = [cells[f"mlp-16/10%/soft-target/{s}"]["accuracy"] for s in (0, 1)]
    change = 100 * (sum(distilled) - sum(scratch)) / 2
    assert f"| {100 * sum(scratch) / 2:.1f} ± " in rows["soft-target 10%"]
    assert f"| {change:+.1f} |" in rows["soft-target 10%"]
    assert "(all candidates)" in rows["auto 10%"]

    auto = cells["mlp-16/10%/auto/0"]["search"]
    best = max(auto["candidates"], key=lambda c: c["val_accuracy"])
    (row,) = [line for line in _quality("search", "--results", tmp_path / "q.json").splitlines()
              if line.startswith("| mlp-16")]  # the one search of seed 0: how a recipe would be chosen
    teacher = cells["mlp-16/10%/auto/0"]
    assert row.startswith(f"| mlp-16 | {teacher['teacher']} ({100 * teacher['teacher_accuracy']:.2f}) | 10% | auto | base | {100 * auto['scratch_val_accuracy']:.2f} | {best['setting']} "
                          f"| {100 * best['val_accuracy']:.2f} |"), row


def test_a_method_with_a_budget_is_compared_with_a_scratch_twin_of_that_budget(tmp_path):
    (tmp_path / "teacher.yaml").write_text("teacher: {model: tinycnn-8, epochs: 2, batch_size: 128}\n")
    matrix = {
        "seeds": [0], "regimes": {"all": 1.0},
        "base": {"data": {"name": "digits"}, "train": {"epochs": 1, "batch_size": 64, "threads": 1},
                 "output": {"latency": False}},
        "budgets": {"longer": {"train": {"epochs": 3, "lr_schedule": "cosine"}}},
        "teachers": {"small": {"model": "tinycnn-8", "folder": str(tmp_path / "teacher"),
                               "config": str(tmp_path / "teacher.yaml")}},
        "students": {"mlp-16": {"teacher": "small", "methods": ["soft-target", "longer"]}},
        "methods": {"soft-target": {"method": {"name": "soft-target"}},
                    "longer": {"budget": "longer", "method": {"name": "soft-target", "temperature": 2.0}},
                    "unused": {"method": {"name": "dkd"}}},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    paths = ["--matrix", tmp_path / "m.yaml", "--results", tmp_path / "q.json"]
    assert _quality("plan", *paths).splitlines()[-1] == "0 of 2 cells done"  # "unused" is not the student's
    _quality("run", *paths, "--out", tmp_path / "runs")
    cells = {c["name"]: c for c in json.loads((tmp_path / "q.json").read_text())["cells"]}
    assert sorted(cells) == ["mlp-16/all/longer/0", "mlp-16/all/soft-target/0"]
    # the budget's cells trained in their own folder, both students with the budget's 3 epochs
    for kind, recorded in (("scratch", cells["mlp-16/all/longer/0"]["twin"]), ("distilled", cells["mlp-16/all/longer/0"])):
        stamp = json.loads((tmp_path / "runs" / "mlp-16-all-longer" / "students" / f"{kind}-labels1-seed0.json")
                           .read_text())
        assert stamp["result"]["accuracy"] == recorded["accuracy"]
        epochs = [json.loads(line)["epoch"] for line in (tmp_path / "runs" / "mlp-16-all-longer" / "metrics.jsonl")
                  .read_text().splitlines() if json.loads(line).get("stage") == kind and "val_accuracy" in line]
        assert max(epochs) == 3, (kind, epochs)
    assert cells["mlp-16/all/longer/0"]["budget"] == "longer"
    base = json.loads((tmp_path / "runs" / "mlp-16-all" / "students" / "scratch-labels1-seed0.json").read_text())
    assert cells["mlp-16/all/soft-target/0"]["twin"]["accuracy"] == base["result"]["accuracy"]
    rows = {line.split(" | ")[2]: line for line in _quality("table", *paths).splitlines() if line.startswith("| mlp-16")}
    for method in ("longer", "soft-target"):
        change = 100 * (cells[f"mlp-16/all/{method}/0"]["accuracy"] - cells[f"mlp-16/all/{method}/0"]["twin"]["accuracy"])
        assert f"| {change:+.1f} |" in rows[method], rows[method]
    val = {line.split(" | ")[2]: line for line in _quality("table", *paths, "--split", "val").splitlines()
           if line.startswith("| mlp-16")}
    assert f"| {100 * cells['mlp-16/all/longer/0']['twin']['val_accuracy']:.1f} ± " in val["longer"]

    matrix["methods"]["longer"]["train"] = {"epochs": 5}  # outside a budget: its scratch twin would not share it
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    result = subprocess.run([sys.executable, str(SCRIPT), "plan", *map(str, paths)], capture_output=True, text=True)
    assert result.returncode != 0 and "put data, train and cache settings in a named entry of 'budgets'" in result.stderr


def _module():
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def _matrix():
    """benchmarks/quality_matrix.py: what a matrix names and which cells are done."""
    spec = importlib.util.spec_from_file_location("quality_matrix_benchmark", SCRIPT.with_name("quality_matrix.py"))
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    return matrix


def test_a_cell_rerun_on_other_cpu_kernels_changes_only_its_own_row(tmp_path):
    # soft-target and auto share a run folder and so, on one machine, a scratch twin; a cell rerun on
    # another machine trains another twin, and must not move the row of the method it did not run
    quality = _module()
    matrix = {"seeds": [0, 1], "regimes": {"all": 1.0},
              "base": {"data": {"name": "digits"}, "train": {"epochs": 1}},
              "teachers": {"small": {"model": "tinycnn-8", "folder": "t", "config": "t.yaml"}},
              "students": {"mlp-16": {"teacher": "small"}},
              "methods": {"soft-target": {"method": {"name": "soft-target"}}, "auto": {"method": {"name": "auto"}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix))
    results = tmp_path / "q.json"

    def cell(method, seed, accuracy, twin, kernels):
        return {"name": f"mlp-16/all/{method}/{seed}", "student": "mlp-16", "regime": "all", "method": method,
                "seed": seed, "teacher_accuracy": 0.95, "cpu_kernels": kernels, "accuracy": accuracy,
                "val_accuracy": accuracy, "train_s": 60.0, "search": {"train_s": 300.0},
                "twin": {"accuracy": twin, "val_accuracy": twin, "train_s": 60.0}}

    for seed in (0, 1):
        for method in ("soft-target", "auto"):
            quality.save_cell(results, cell(method, seed, 0.90, 0.88, "AVX512"), tmp_path / "m.yaml")

    def rows():
        return {line.split(" | ")[2]: line for line in quality.table(tmp_path / "m.yaml", results).splitlines()
                if line.startswith("| mlp-16")}

    before = rows()
    assert "| 88.0 ± 0.0 | 90.0 ± 0.0 | +2.0 |" in before["soft-target"] and "kernel" not in "".join(before.values())
    quality.save_cell(results, cell("auto", 1, 0.89, 0.85, "AVX2"), tmp_path / "m.yaml")  # rerun elsewhere
    after = rows()
    assert after["soft-target"] == before["soft-target"]
    assert "| 86.5 ± 2.1 | 89.5 ± 0.7 | +3.0 |" in after["auto"], after["auto"]
    note = "kernel set (each cell's `cpu_kernels`: its students', over every sitting) in: {}. Each seed's change"
    assert note.format("mlp-16 all auto") in quality.table(tmp_path / "m.yaml", results)
    # one cell whose students trained on two kernel sets (resumed on another CPU) is named too
    quality.save_cell(results, cell("soft-target", 1, 0.90, 0.88, "AVX2 + AVX512"), tmp_path / "m.yaml")
    assert note.format("mlp-16 all auto; mlp-16 all soft-target") in quality.table(tmp_path / "m.yaml", results)
    # a cell, or a sitting, from before kernel sets were recorded is unknown: said so, not counted as another set
    unknown = {k: v for k, v in cell("soft-target", 0, 0.90, 0.88, "").items() if k != "cpu_kernels"}
    for seed, recorded in ((0, unknown), (1, cell("soft-target", 1, 0.90, 0.88, "AVX512 + not recorded"))):
        quality.save_cell(results, recorded, tmp_path / "m.yaml")
    text = quality.table(tmp_path / "m.yaml", results)
    assert note.format("mlp-16 all auto") in text
    assert text.endswith(" Kernel sets not recorded (trained before softkd recorded them): for some seeds or sittings "
                         "of mlp-16 all soft-target.")
    for seed in (0, 1):
        quality.save_cell(results, {**unknown, "name": f"mlp-16/all/auto/{seed}", "method": "auto", "seed": seed},
                          tmp_path / "m.yaml")
    text = quality.table(tmp_path / "m.yaml", results)
    assert "more than one kernel set" not in text and text.endswith(
        "for some seeds or sittings of mlp-16 all soft-target; for every seed of mlp-16 all auto.")


def test_a_recipe_per_regime_trains_in_its_regime_and_a_changed_recipe_reruns_its_cells(tmp_path):
    quality = _module()
    few = {"budget": "longer", "method": {"name": "soft-target", "temperature": 4.0, "beta": 1.0}}
    matrix = {"seeds": [0], "regimes": {"all": 1.0, "10%": 0.1},
              "base": {"data": {"name": "digits"}, "train": {"epochs": 1}},
              "budgets": {"longer": {"train": {"epochs": 3}}},
              "teachers": {"small": {"model": "tinycnn-8", "folder": "t", "config": "t.yaml"}},
              "students": {"mlp-16": {"teacher": "small", "methods": [], "recipe": {
                  "all": {"method": {"name": "soft-target", "temperature": 2.0, "beta": 0.5}}, "10%": few}}},
              "methods": {"soft-target": {"method": {"name": "soft-target"}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    by_name = {c["name"]: c for c in _matrix().cells(_matrix().load_matrix(tmp_path / "m.yaml"))}
    assert sorted(by_name) == ["mlp-16/10%/recipe/0", "mlp-16/all/recipe/0"]
    assert by_name["mlp-16/10%/recipe/0"]["settings"] == few
    config = quality.run_config(matrix, by_name["mlp-16/10%/recipe/0"], tmp_path, tmp_path / "runs")
    assert config["train"]["epochs"] == 3 and config["method"]["beta"] == 1.0 and config["data"]["labeled_fraction"] == 0.1
    assert config_from_dict(quality.run_config(matrix, by_name["mlp-16/all/recipe/0"], tmp_path, tmp_path)).train.epochs == 1

    def done(regime, method, budget=None):  # a finished cell as `run` records it
        return {"name": f"mlp-16/{regime}/recipe/0", "student": "mlp-16", "regime": regime, "method": "recipe",
                "seed": 0, "teacher_accuracy": 0.95, "accuracy": 0.9, "val_accuracy": 0.9, "train_s": 60.0,
                "settings": {**method, "kd_scale": 1.0}, **({"budget": budget} if budget else {}),
                "twin": {"accuracy": 0.85, "val_accuracy": 0.85, "train_s": 60.0}}

    results = tmp_path / "q.json"
    quality.save_cell(results, done("all", matrix["students"]["mlp-16"]["recipe"]["all"]["method"]), tmp_path / "m.yaml")
    quality.save_cell(results, done("10%", few["method"], "longer"), tmp_path / "m.yaml")
    assert quality.plan(tmp_path / "m.yaml", results).splitlines()[-1] == "2 of 2 cells done"

    # the 10% regime's validation split now chooses another recipe: its cell ran other settings
    matrix["students"]["mlp-16"]["recipe"]["10%"] = {"budget": "longer", "method": {"name": "soft-target", "temperature": 2.0}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    assert quality.plan(tmp_path / "m.yaml", results).splitlines() == [
        "done  mlp-16/all/recipe/0", "stale mlp-16/10%/recipe/0",
        "1 of 2 cells done (1 stale: run with other settings than the matrix now names; `run` reruns them)"]
    rows = {line.split(" | ")[1]: line for line in quality.table(tmp_path / "m.yaml", results).splitlines()
            if line.startswith("| mlp-16")}
    assert "not run yet" in rows["10%"] and "| +5.0 |" in rows["all"]  # the stale cell is left out
    del matrix["students"]["mlp-16"]["recipe"]["10%"]["budget"]  # same method, the base budget: stale too
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    assert "stale mlp-16/10%/recipe/0" in quality.plan(tmp_path / "m.yaml", results)
    # a run records every setting with its defaults: a grid the matrix gives in part is still current
    auto = {"settings": {"name": "auto", "grid": {"temperature": [2.0, 4.0], "beta": [0.5, 0.9]}, "candidates": None}}
    assert not quality.stale(auto, {"method": {"name": "auto", "grid": {"temperature": [2, 4]}}})
    assert quality.stale(auto, {"method": {"name": "auto", "grid": {"temperature": [2, 8]}}})

    matrix["students"]["mlp-16"]["recipe"] = {"3%": few}  # a regime the matrix does not have
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    result = subprocess.run([sys.executable, str(SCRIPT), "plan", "--matrix", str(tmp_path / "m.yaml")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "recipe names regimes ['3%']" in result.stderr


def test_a_pending_matrix_extends_the_published_one_and_names_only_the_recipe_it_changes(tmp_path):
    # a candidate recipe's test seeds run apart from the published cells: the pending matrix changes
    # one regime's recipe (replaced whole: none of the old method's settings stay) and adds its budget
    matrix_module = _matrix()
    published = {"seeds": [0, 1], "regimes": {"all": 1.0, "10%": 0.1},
                 "base": {"data": {"name": "digits"}, "train": {"epochs": 1}},
                 "budgets": {"long": {"train": {"epochs": 3}}},
                 "teachers": {"small": {"model": "tinycnn-8", "folder": "t", "config": "t.yaml"}},
                 "students": {"mlp-16": {"teacher": "small", "recipe": {
                     "all": {"budget": "long", "method": {"name": "soft-target", "temperature": 1.0, "beta": 0.9}},
                     "10%": {"method": {"name": "soft-target", "temperature": 2.0}}},
                     "recipe_config": {"all": "a.yaml", "10%": "b.yaml"}}},
                 "methods": {"soft-target": {"method": {"name": "soft-target", "temperature": 4.0}}}}
    candidate = {"budget": "longer", "method": {"name": "dkd"}}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(published))
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / "p.yaml").write_text(yaml.safe_dump({
        "extends": "../q.yaml", "budgets": {"longer": {"train": {"epochs": 6}}},
        "students": {"mlp-16": {"recipe": {"all": candidate}, "recipe_config": {"all": "c.yaml"}}}}))
    pending = matrix_module.load_matrix(tmp_path / "pending" / "p.yaml")
    spec = pending["students"]["mlp-16"]
    assert spec["recipe"] == {"all": candidate, "10%": published["students"]["mlp-16"]["recipe"]["10%"]}
    assert spec["recipe_config"] == {"all": "c.yaml", "10%": "b.yaml"} and spec["teacher"] == "small"
    assert pending["budgets"] == {"long": {"train": {"epochs": 3}}, "longer": {"train": {"epochs": 6}}}
    assert {k: v for k, v in pending.items() if k not in ("budgets", "students")} == {
        k: v for k, v in published.items() if k not in ("budgets", "students")}
    by_name = {c["name"]: c["settings"] for c in matrix_module.cells(pending)}
    assert by_name["mlp-16/all/recipe/1"] == candidate and by_name["mlp-16/all/soft-target/0"]["method"]["temperature"] == 4
    assert matrix_module.load_matrix(tmp_path / "q.yaml") == published  # the published matrix is untouched

    (tmp_path / "q.yaml").write_text(yaml.safe_dump({**published, "extends": "pending/p.yaml"}))
    with pytest.raises(SystemExit, match="extends itself"):
        matrix_module.load_matrix(tmp_path / "q.yaml")


def test_a_pending_recipe_is_promoted_once_the_matrix_names_it_and_all_its_seeds_are_done(tmp_path):
    quality = _module()
    old = {"budget": "long", "method": {"name": "soft-target", "temperature": 1.0, "beta": 0.9}}
    new = {"budget": "longer", "method": {"name": "soft-target", "temperature": 2.0, "beta": 0.5}}
    matrix = {"seeds": [0, 1], "regimes": {"all": 1.0, "10%": 0.1},
              "base": {"data": {"name": "digits"}, "train": {"epochs": 1}},
              "budgets": {"long": {"train": {"epochs": 3}}, "longer": {"train": {"epochs": 6}}},
              "teachers": {"small": {"model": "tinycnn-8", "folder": "t", "config": "t.yaml"}},
              "students": {"mlp-16": {"teacher": "small", "methods": [], "recipe": {"all": old, "10%": old}}},
              "methods": {"soft-target": {"method": {"name": "soft-target"}}}}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))

    def done(regime, seed, recipe, accuracy):
        return {"name": f"mlp-16/{regime}/recipe/{seed}", "student": "mlp-16", "regime": regime, "method": "recipe",
                "seed": seed, "teacher_accuracy": 0.95, "accuracy": accuracy, "val_accuracy": accuracy,
                "train_s": 60.0, "settings": {**recipe["method"], "kd_scale": 1.0}, "budget": recipe["budget"],
                "twin": {"accuracy": 0.85, "val_accuracy": 0.85, "train_s": 60.0}}

    results, pending = tmp_path / "q.json", tmp_path / "p.json"
    for regime in ("all", "10%"):
        for seed in (0, 1):
            quality.save_cell(results, done(regime, seed, old, 0.88), tmp_path / "q.yaml")
    for name in ("mlp-16/all/recipe/0", "mlp-16/all/recipe/1", "mlp-16/10%/recipe/0"):  # 10%'s seed 1 still runs
        regime, _, seed = name.split("/")[1:]
        quality.save_cell(pending, done(regime, int(seed), new, 0.91), tmp_path / "p.yaml")
    before = results.read_text()

    def promote(*only):
        return subprocess.run([sys.executable, str(SCRIPT), "promote", "--matrix", str(tmp_path / "q.yaml"),
                               "--results", str(results), "--from", str(pending), *[f"--only={o}" for o in only]],
                              capture_output=True, text=True)

    result = promote("/all/")  # the matrix still names the old recipe
    assert result.returncode != 0
    assert "does not name mlp-16/all/recipe/0 with the settings it ran (budget longer" in result.stderr
    matrix["students"]["mlp-16"]["recipe"] = {"all": new, "10%": new}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    result = promote("/10%/")
    assert result.returncode != 0 and "mlp-16/10%/recipe has no cell of seeds [1]" in result.stderr
    result = promote("all/recipe/0")  # --only leaving a seed out is refused the same way
    assert result.returncode != 0 and "mlp-16/all/recipe has no cell of seeds [1]" in result.stderr
    assert results.read_text() == before and "stale mlp-16/all/recipe/0" in quality.plan(tmp_path / "q.yaml", results)

    result = promote("/all/")
    assert result.returncode == 0, result.stderr
    assert "moved 2 cells" in result.stdout
    assert quality.plan(tmp_path / "q.yaml", results).splitlines() == [
        "done  mlp-16/all/recipe/0", "stale mlp-16/10%/recipe/0", "done  mlp-16/all/recipe/1", "stale mlp-16/10%/recipe/1",
        "2 of 4 cells done (2 stale: run with other settings than the matrix now names; `run` reruns them)"]
    row = next(line for line in quality.table(tmp_path / "q.yaml", results).splitlines() if "| all |" in line)
    assert "| 85.0 ± 0.0 | 91.0 ± 0.0 | +6.0 |" in row
    assert [c["name"] for c in json.loads(pending.read_text())["cells"]] == ["mlp-16/10%/recipe/0"]  # what still runs
    assert promote("/all/").returncode != 0  # nothing left to move


@pytest.mark.parametrize("name", sorted(p.name for p in SCRIPT.parent.glob("quality*.yaml")))
def test_each_recipe_config_trains_what_the_matrix_measured(name):
    """The published matrix, and a pending one while a new recipe's test seeds run."""
    quality = _module()
    root = SCRIPT.parents[1]
    matrix = quality.load_matrix(SCRIPT.parent / name)
    recipes = {s: spec for s, spec in matrix["students"].items() if spec.get("recipe")}
    assert recipes
    for student, spec in recipes.items():
        for regime, fraction in matrix["regimes"].items():
            recipe, path = _matrix().recipe_of(spec, regime), _matrix().recipe_of(spec, regime, "recipe_config")
            assert (recipe is None) == (path is None), (student, regime)  # every recipe has its config
            if recipe is None:
                continue
            config = load_config(root / path)
            cell = {"student": student, "regime": regime, "seed": 0, "settings": recipe}
            measured = config_from_dict(quality.run_config(matrix, cell, root, root / "runs"))
            assert fraction in config.data.fractions and set(matrix["seeds"]) <= set(config.train.seeds)
            assert config.method == measured.method, student
            assert config.student == measured.student and config.teacher.checkpoint.endswith(
                measured.teacher.checkpoint.split(str(root) + "/")[1]), student
            for section, skip in (("train", {"seeds", "threads"}), ("data", {"labeled_fraction"})):
                assert getattr(config, section).model_dump(exclude=skip) == \
                    getattr(measured, section).model_dump(exclude=skip), (student, section)
            assert config.cache.views == measured.cache.views


def test_stopping_the_benchmark_stops_the_cell_it_runs(tmp_path):
    (tmp_path / "teacher.yaml").write_text("teacher: {model: tinycnn-8, epochs: 1, batch_size: 128}\n")
    matrix = {"seeds": [0], "regimes": {"all": 1.0},
              "base": {"data": {"name": "digits"}, "train": {"epochs": 200, "batch_size": 16, "threads": 1},
                       "output": {"latency": False}},
              "teachers": {"small": {"model": "tinycnn-8", "folder": str(tmp_path / "teacher"),
                                     "config": str(tmp_path / "teacher.yaml")}},
              "students": {"mlp-16": {"teacher": "small"}}, "methods": {"soft-target": {"method": {"name": "soft-target"}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    bench = subprocess.Popen([sys.executable, str(SCRIPT), "run", "--matrix", str(tmp_path / "m.yaml"), "--results",
                              str(tmp_path / "q.json"), "--out", str(tmp_path / "runs")],
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE, text=True)
    deadline, child = time.monotonic() + 300, None
    while child is None and time.monotonic() < deadline:  # the cell's `softkd run`, once the teacher is trained
        children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children").read_text().split()
        runs = [int(c) for c in children if b"softkd.cli\x00run" in Path(f"/proc/{c}/cmdline").read_bytes()]
        child = runs[0] if runs else None
        time.sleep(0.2)
    assert child is not None, "the cell never started"
    bench.terminate()
    assert bench.wait(timeout=60) != 0 and "stopped (SIGTERM)" in bench.stderr.read()
    for _ in range(100):  # the child is gone, not orphaned and still training
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"softkd run {child} still runs after its benchmark was stopped")
    assert not (tmp_path / "q.json").exists()  # the unfinished cell is not recorded


def test_a_stopped_cell_with_checkpoints_continues_where_it_stopped_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "teacher.yaml").write_text("teacher: {model: tinycnn-8, epochs: 1, batch_size: 128}\n")
    matrix = {"seeds": [0], "regimes": {"all": 1.0},
              "base": {"data": {"name": "digits"}, "train": {"epochs": 2, "batch_size": 64, "threads": 1},
                       "output": {"latency": False}},
              "budgets": {"saved": {"train": {"epochs": 20, "batch_size": 16, "checkpoint_every": 100000}}},
              "teachers": {"small": {"model": "tinycnn-8", "folder": str(tmp_path / "teacher"),
                                     "config": str(tmp_path / "teacher.yaml")}},
              "students": {"mlp-16": {"teacher": "small"}},
              "methods": {"soft-target": {"budget": "saved", "method": {"name": "soft-target"}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    common = ["--matrix", tmp_path / "m.yaml"]
    _quality("run", *common, "--results", tmp_path / "clean.json", "--out", tmp_path / "clean")

    folder = tmp_path / "runs" / "mlp-16-all-saved"
    bench = subprocess.Popen([sys.executable, str(SCRIPT), "run", *map(str, common), "--results",
                              str(tmp_path / "q.json"), "--out", str(tmp_path / "runs")],
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(folder.glob("students/scratch-labels1-seed0.ckpt/ckpt-*.pt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    bench.terminate()  # after the scratch twin's first epoch-end checkpoint
    assert bench.wait(timeout=60) != 0, bench.stderr.read()
    assert not (folder / "students" / "scratch-labels1-seed0.safetensors").exists(), "stopped too late"
    assert not (tmp_path / "q.json").exists()
    saved = torch.load(max(folder.glob("students/scratch-labels1-seed0.ckpt/ckpt-*.pt")), weights_only=True)

    _quality("run", *common, "--results", tmp_path / "q.json", "--out", tmp_path / "runs")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if r["stage"] == "scratch" and r.get("epoch") == 1 and "kind" not in r]
    assert len(first) == 1  # continued after epoch 1, not started over (that would log epoch 1 again)
    (clean,), (resumed,) = (json.loads((tmp_path / f"{n}.json").read_text())["cells"] for n in ("clean", "q"))
    for key in ("accuracy", "val_accuracy"):
        assert (resumed[key], resumed["twin"][key]) == (clean[key], clean["twin"][key]), key
    # the twin's training time counts both sittings: the first one's, then at least the epochs trained after
    after = sum(r["epoch_s"] for r in records
                if r["stage"] == "scratch" and "kind" not in r and r.get("epoch", 0) >= saved["epoch"])
    assert resumed["twin"]["train_s"] >= saved["train_s"] + after
    # both sittings on this CPU: one kernel set, as for the cell that never stopped
    assert resumed["cpu_kernels"] == clean["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    for kind in ("scratch", "distilled"):
        a, b = (load_file(root / "mlp-16-all-saved" / "students" / f"{kind}-labels1-seed0.safetensors")
                for root in (tmp_path / "clean", tmp_path / "runs"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_the_gpu_script_runs_what_fits_its_time_budget_then_prints_the_table(tmp_path):
    # QUALITY_DEVICE=cpu: the same script a GPU call runs; a cell still training at the budget is
    # stopped and left out, the cells before it are kept, and the table is printed either way
    (tmp_path / "teacher.yaml").write_text("teacher: {model: tinycnn-8, epochs: 1, batch_size: 128}\n")
    matrix = {"seeds": [0], "regimes": {"all": 1.0},
              "base": {"data": {"name": "digits"}, "train": {"epochs": 1, "batch_size": 64, "threads": 1},
                       "output": {"latency": False}},
              "budgets": {"slow": {"train": {"epochs": 400, "batch_size": 8}}},
              "teachers": {"small": {"model": "tinycnn-8", "folder": str(tmp_path / "teacher"),
                                     "config": str(tmp_path / "teacher.yaml")}},
              "students": {"mlp-16": {"teacher": "small"}},
              "methods": {"soft-target": {"method": {"name": "soft-target"}},
                          "slow": {"budget": "slow", "method": {"name": "soft-target"}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False))
    script = SCRIPT.parent / "gpu_quality.sh"
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(tmp_path),
           "QUALITY_DEVICE": "cpu", "PYTHON": sys.executable}

    def call(budget, *args):
        result = subprocess.run(["bash", str(script), "--out", str(tmp_path / "runs"), *args],
                                capture_output=True, text=True, timeout=600,
                                env={**env, "QUALITY_BUDGET_S": str(budget)})
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    first = call(600, "--matrix", tmp_path / "m.yaml", "--only", "/soft-target/")
    assert "stopped at the" not in first and "| mlp-16 (tinycnn-8) | all | soft-target |" in first
    (cell,) = json.loads((tmp_path / "quality-gpu.json").read_text())["cells"]
    assert cell["name"] == "mlp-16/all/soft-target/0" and cell["device"].startswith("cpu")
    written = yaml.safe_load((tmp_path / "runs" / "configs" / "mlp-16_all_soft-target_0.yaml").read_text())
    assert written["train"]["device"] == "cpu"  # QUALITY_DEVICE, passed as quality.py run --device
    second = call(10, f"--matrix={tmp_path / 'm.yaml'}")  # the slow cell trains far longer than 10 s
    assert "stopped at the 10 s budget" in second
    assert [c["name"] for c in json.loads((tmp_path / "quality-gpu.json").read_text())["cells"]] == [cell["name"]]
    rows = [line for line in second.splitlines() if line.startswith("| mlp-16")]
    assert "not run yet" in rows[1] and "| 1 |" in rows[0]
