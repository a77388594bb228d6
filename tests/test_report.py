"""report/: the outcome in words, pooling over seeds and runs, report.md / report.html from a real
run, and the page checked in a real headless browser with the network off."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from typer.testing import CliRunner

from softkd.cli import app
from softkd.config import RunConfig
from softkd.pipeline import run_experiment
from softkd.report.compare import comparison_rows
from softkd.report.summary import in_words, pool_details, stats

TINY = {"data": {"name": "digits", "labeled_fraction": [1.0, 0.5]}, "teacher": {"model": "mlp-32", "epochs": 3},
        "student": {"model": "mlp-8"}, "train": {"epochs": 3, "seeds": [0, 1], "batch_size": 128}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_experiment(RunConfig.model_validate(TINY), out_dir=out)
    return out


def _entry(scratch, distilled, teacher=None):
    entry = {"scratch": {"accuracy": stats(scratch)}, "distilled": {"accuracy": stats(distilled)}}
    if teacher is not None:
        s, d = entry["scratch"]["accuracy"]["mean"], entry["distilled"]["accuracy"]["mean"]
        entry.update(teacher={"accuracy": stats([teacher])}, gap_recovered=(d - s) / (teacher - s))
    return entry


@pytest.mark.parametrize("scratch, distilled, start, figures", [
    ([0.90, 0.91, 0.92], [0.95, 0.96, 0.97], "Distillation beat the equal-budget scratch student",
     "96.0 ± 1.0 % distilled against 91.0 ± 1.0 % from scratch (+5.0 points, 3 seeds)"),
    ([0.95, 0.96, 0.97], [0.90, 0.91, 0.92], "Distillation did worse than the equal-budget scratch student",
     "(-5.0 points, 3 seeds)"),
    ([0.90, 0.95, 0.99], [0.91, 0.96, 0.99], "Distillation made no clear difference",
     "(+0.7 points, 3 seeds), within twice the standard error (7.0 points)"),
    ([0.90], [0.95], "With one seed there is no error estimate", "(+5.0 points, 1 seed); run more seeds"),
])
def test_the_outcome_is_said_in_words_for_each_case(scratch, distilled, start, figures):
    sentence = in_words("mlp-8", "100% labels", _entry(scratch, distilled))
    assert sentence.startswith(start + ":") and figures in sentence and sentence.endswith(".")
    assert "gap" not in sentence  # no teacher: nothing to recover


def test_the_words_give_the_gap_recovered_with_a_teacher_and_not_for_one_seed():
    several = in_words("s", "3% labels", _entry([0.80, 0.82], [0.88, 0.90], teacher=0.93))
    assert several.endswith("it recovered 67 % of the gap to the teacher (93.0 %).")
    assert "gap" not in in_words("s", "3% labels", _entry([0.80], [0.88], teacher=0.93))
    worse = in_words("s", "100% labels", _entry([0.88, 0.89], [0.86, 0.87], teacher=0.985))
    assert worse.endswith("the gap to the teacher (98.5 %) grew by 20 % instead of closing.")


def _detail(per_class, confusion, count, confidence, accuracy):
    return {"top5": None, "per_class_accuracy": per_class, "confusion": confusion,
            "reliability": {"edges": [0.0, 0.5, 1.0], "count": count, "confidence": confidence, "accuracy": accuracy}}


def test_details_pool_over_seeds_counts_summed_and_bins_weighted():
    a = _detail([1.0, 0.5], [[2, 0], [1, 1]], [1, 3], [0.4, 0.8], [0.0, 1.0])
    b = _detail([0.5, None], [[1, 1], [0, 0]], [0, 2], [None, 0.9], [None, 0.5])
    pooled = pool_details([a, None, b])
    assert pooled["per_class_accuracy"] == [0.75, 0.5]  # a class absent from a seed's test set is skipped
    assert pooled["confusion"] == [[3, 1], [1, 1]]
    rel = pooled["reliability"]
    assert rel["count"] == [1, 5]
    assert rel["confidence"][0] == pytest.approx(0.4) and rel["confidence"][1] == pytest.approx((3 * 0.8 + 2 * 0.9) / 5)
    assert rel["accuracy"][1] == pytest.approx((3 * 1.0 + 2 * 0.5) / 5)
    assert pool_details([None, None]) is None


def _report(seeds, scratch, distilled, method="soft-target"):
    regime = {"scratch": {"accuracy": {"runs": scratch}}, "distilled": {"accuracy": {"runs": distilled}}}
    return {"seeds": seeds, "method": {"name": method, "formula": "f"}, "data": {"name": "digits"},
            "teacher": {"model": "t", "accuracy": 0.99},
            "students": {"mlp-8": {"params": 1, "regimes": {"100% labels": regime}}}}


def test_several_runs_pool_into_one_row_per_setting_each_seed_once():
    rows = comparison_rows([
        ("a", _report([0, 1], [0.90, 0.92], [0.94, 0.95])),
        ("b", _report([1, 2], [0.92, 0.94], [0.95, 0.96])),  # seed 1 again: the same student, counted once
        ("c", _report([0], [0.90], [0.80], method="dkd")),
    ])
    assert len(rows) == 2
    pooled = rows[0]
    assert pooled["runs"] == ["a", "b"] and pooled["seeds"] == [0, 1, 2]
    assert pooled["scratch"]["runs"] == [0.90, 0.92, 0.94] and pooled["distilled"]["mean"] == pytest.approx(0.95)
    assert pooled["gap_recovered"] == pytest.approx((0.95 - 0.92) / (0.99 - 0.92))
    assert pooled["verdict"].startswith("distillation helped")
    assert rows[1]["method"] == "dkd" and rows[1]["verdict"].endswith("(one seed: no error estimate)")


def test_a_run_writes_the_json_the_markdown_and_the_page(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["schema_version"] == 4
    regime = report["students"]["mlp-8"]["regimes"]["100% labels"]
    detail = regime["distilled"]["detail"]
    assert sum(map(sum, detail["confusion"])) == 2 * report["data"]["test"]  # two seeds, summed
    assert len(detail["per_class_accuracy"]) == 10 and detail["top5"] is not None
    assert report["teacher"]["detail"]["reliability"]["count"] and "confusion" in report["teacher"]["detail"]
    speed = report["speed"]
    assert set(speed["models"]) == {"teacher", "mlp-8"} and speed["threads"] >= 1
    assert speed["models"]["teacher"]["params"] == report["teacher"]["params"]
    line = speed["headlines"]["mlp-8"]["100% labels"]
    assert line.startswith("student: ") and "fewer parameters" in line and "headline" not in regime
    markdown = (run_dir / "report.md").read_text()
    assert "| student | regime |" in markdown and "scored" in markdown and line in markdown
    page = (run_dir / "report.html").read_text()
    assert page.count("<img ") >= 5 and "http://" not in page and "https://" not in page
    assert "<script" not in page


def test_old_stamps_without_detail_are_completed_without_training(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    stamp = copy / "students" / "distilled-labels1-seed0.json"
    record = json.loads(stamp.read_text())
    del record["result"]["detail"]  # as softkd 0.3 wrote it
    stamp.write_text(json.dumps(record))
    before = (copy / "metrics.jsonl").read_text().count('"epoch_s"')
    report = run_experiment(RunConfig.model_validate(TINY), out_dir=copy)
    assert (copy / "metrics.jsonl").read_text().count('"epoch_s"') == before  # nothing trained again
    assert json.loads(stamp.read_text())["result"]["detail"]["confusion"] is not None
    assert report["students"]["mlp-8"]["regimes"]["100% labels"]["distilled"]["detail"] is not None


def test_the_report_says_when_its_students_trained_on_other_cpu_kernels(run_dir, tmp_path):
    # CPU figures differ in their last bits between kernel sets: each student's stamp records the
    # sets it trained on; a student reused from a run elsewhere (or with no record) is named in the report.
    here = torch.backends.cpu.get_cpu_capability()
    report = json.loads((run_dir / "report.json").read_text())
    stamps = [json.loads(p.read_text())["result"] for p in (run_dir / "students").glob("*.json")]
    assert len(stamps) == 8 and all(s["cpu_kernels"] == [here] for s in stamps)
    assert report["hardware"]["students_cpu_kernels"] == [here]
    assert "Its students trained on" not in (run_dir / "report.md").read_text()

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name, kernels in [("scratch-labels1-seed1", ["ELSEWHERE"]), ("distilled-labels0.5-seed0", None)]:
        stamp = copy / "students" / f"{name}.json"
        record = json.loads(stamp.read_text())
        if kernels is None:
            del record["result"]["cpu_kernels"]  # as softkd 0.4.0 wrote it
        else:
            record["result"]["cpu_kernels"] = kernels
        stamp.write_text(json.dumps(record))
    report = run_experiment(RunConfig.model_validate(TINY), out_dir=copy)
    trained = sorted(["ELSEWHERE", here, "not recorded"])
    assert report["hardware"]["students_cpu_kernels"] == trained
    note = f"Its students trained on kernel sets {', '.join(trained)} (over resumed sittings, or reused"
    assert note in (copy / "report.md").read_text() and note in (copy / "report.html").read_text()


def test_softkd_report_renders_one_run_again_and_compares_several(run_dir, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(run_dir, one)
    (one / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(one), "--figures"])
    assert result.exit_code == 0, result.output
    assert (one / "report.html").is_file()
    pngs = sorted(p.name for p in (one / "figures").iterdir())
    assert {"accuracy.png", "curves.png", "latency.png", "classes-mlp-8-50pct.png"} <= set(pngs)
    assert all(_png_size((one / "figures" / p).read_bytes())[0] > 100 for p in pngs)
    result = CliRunner().invoke(app, ["report", str(one), str(run_dir), "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "both" / "report.md").read_text()
    assert "2 runs compared" in markdown and "| digits | `soft-target` | mlp-8 | 100% labels | 2 |" in markdown


def test_softkd_report_on_a_folder_without_a_report_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "has no report.json" in result.output


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_page_loads_offline_in_a_real_browser_with_every_plot_decoded(run_dir, tmp_path):
    browser_path = _chromium()
    if browser_path is None or not _has_playwright():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs chromium-headless-shell and playwright")
        pytest.skip("needs headless Chromium and the playwright package (installed by .ci/run)")
    from playwright.sync_api import sync_playwright

    page_file = run_dir / "report.html"
    failed, requested = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path)
        context = browser.new_context(offline=True)  # the network is off: a page that needs it shows it
        page = context.new_page()
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("request", lambda r: requested.append(r.url))
        page.goto(page_file.as_uri(), wait_until="load")
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert failed == []
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
    assert len(images) >= 5 and all(done and w > 0 and h > 0 for done, w, h in images), images
    width, height = _png_size((tmp_path / "report.png").read_bytes())
    assert width > 500 and height > 1000


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True
