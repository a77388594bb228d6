"""The docs cannot rot: every Python example marked ``<!-- test: run -->`` in README.md and docs/
runs, every bundled config the docs name exists and loads (with its teacher checkpoints), and
README's results table is the one the benchmark JSON renders."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import softkd
from softkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKED = re.compile(r"<!-- test: run(?: \(setup: ([\w-]+)\))? -->\n```python\n(.*?)\n```", re.S)


def _digits() -> dict:
    """The names the short examples use: a student, teachers, a transfer set, a batch, logits."""
    splits = softkd.build_dataset("digits")
    torch.manual_seed(0)
    model = lambda name: softkd.build_model(name, input_shape=(1, 8, 8), num_classes=10)  # noqa: E731
    return {"softkd": softkd, "torch": torch, "splits": splits, "student": model("tinycnn-8"),
            "teacher": model("resnet-8"), "teacher_a": model("resnet-8"), "teacher_b": model("tinycnn-8"),
            "teacher_c": model("mlp-32"), "data": softkd.ArrayDataset(splits.train.x[:256], splits.train.y[:256]),
            "x": splits.test.x[:64], "logits": torch.randn(256, 3, 10)}


SETUPS = {"digits": _digits}


def _examples():
    for page in PAGES:
        text = page.read_text()
        for match in MARKED.finditer(text):
            line = text[:match.start()].count("\n") + 2
            yield pytest.param(match.group(1), match.group(2), id=f"{page.relative_to(ROOT)}:{line}")


def test_the_docs_mark_their_examples():
    pages = {param.id.split(":")[0] for param in _examples()}
    assert {"README.md", "docs/getting-started.md", "docs/cascade.md", "docs/methods/index.md",
            "docs/methods/feature.md", "docs/methods/mutual.md"} <= pages, pages


@pytest.mark.parametrize("setup, code", list(_examples()))
def test_a_marked_python_example_runs(setup, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever an example writes stays in its own folder
    namespace = SETUPS[setup]() if setup else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, "<example>", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def _named_configs() -> list[str]:
    return sorted({name for page in PAGES for name in re.findall(r"configs/[\w.+-]+\.yaml", page.read_text())})


def test_the_docs_name_bundled_configs():
    assert len(_named_configs()) >= 10


@pytest.mark.parametrize("name", _named_configs())
def test_every_config_the_docs_name_exists_and_loads_with_its_teachers(name):
    config = load_config(ROOT / name)
    for teacher in config.teacher_list:
        assert teacher.checkpoint is None or (ROOT / teacher.checkpoint).is_file(), teacher.checkpoint


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(page: str, marker: str) -> str:
    return (ROOT / page).read_text().split(f"<!-- {marker}:start -->\n")[1].split(f"\n<!-- {marker}:end -->")[0]


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_the_payoff_table_is_the_one_the_benchmark_json_renders(page):
    quality = _benchmark("quality")
    assert _block(page, "quality") == quality.table(quality.MATRIX, quality.RESULTS)


def test_the_recipe_search_table_is_the_one_the_search_cells_render():
    quality = _benchmark("quality")
    results = ROOT / "benchmarks" / "results"
    assert _block("docs/benchmarks.md", "search") == quality.search_table(
        [results / "recipes.json", quality.RESULTS, results / "recipes-teachers.json"])


def test_the_soft_target_recipes_table_is_the_one_methods_json_renders():
    methods = _benchmark("methods")
    assert _block("docs/benchmarks.md", "headline") == methods.headline(methods.RESULTS)


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200
    commands = [line for line in readme[:20] if line.startswith("pip install")]
    assert commands[0].endswith("softkd demo") and commands[1].endswith("python -m pytest")


def test_every_guarantee_names_a_test_that_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 12
    for row in rows:
        for ref in re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row):
            path, name = ROOT / ref[0], ref[1]
            assert path.is_file(), ref
            if name:
                assert re.search(rf"^def {name}\(", path.read_text(), re.MULTILINE), ref


@pytest.mark.parametrize("page", ["README.md", "docs/cascade.md"])
def test_the_cascade_table_is_the_one_the_benchmark_json_renders(page):
    results = json.loads((ROOT / "benchmarks" / "results" / "cascade.json").read_text())
    assert _block(page, "cascade") == _benchmark("cascade").table(results)
