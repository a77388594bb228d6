"""The demo's claim, measured: with 10 % labels the distilled student beats scratch clearly."""

from importlib import resources

import pytest

from softkd.config import load_config
from softkd.pipeline import run_experiment
from softkd.report.summary import stats, verdict


def test_demo_recipe_distillation_beats_scratch_with_few_labels(tmp_path):
    with resources.as_file(resources.files("softkd") / "recipes" / "demo.yaml") as recipe:
        config = load_config(recipe)
    assert config.train.seeds == [0, 1, 2] and config.data.fractions == [1.0, 0.1]
    report = run_experiment(config, out_dir=tmp_path)
    few = report["students"]["mlp-16"]["regimes"]["10% labels"]
    scratch, distilled = few["scratch"]["accuracy"], few["distilled"]["accuracy"]
    assert distilled["mean"] - scratch["mean"] > 0.02, (scratch, distilled)
    assert few["verdict"].startswith("distillation helped")
    assert report["teacher"]["accuracy"] > 0.97
    assert few["num_labeled"] < 0.11 * few["transfer_size"]


@pytest.mark.parametrize(
    "scratch, distilled, expected",
    [
        ([0.90, 0.91, 0.92], [0.95, 0.96, 0.97], "distillation helped: +5.0 points"),
        ([0.95, 0.96, 0.97], [0.90, 0.91, 0.92], "distillation hurt: -5.0 points"),
        ([0.90, 0.95, 0.99], [0.91, 0.96, 0.99], "no clear difference"),
        ([0.90], [0.95], "one seed: no error estimate"),
    ],
)
def test_verdict_is_plain_about_the_outcome(scratch, distilled, expected):
    assert verdict(stats(scratch), stats(distilled)).startswith(expected) or expected in verdict(
        stats(scratch), stats(distilled))
