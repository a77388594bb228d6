"""Run configs: defaults, YAML, --set overrides, and one-line errors with a 'did you mean'."""

import pytest

from softkd.config import RunConfig, dump_config, load_config
from softkd.errors import ConfigError


def test_defaults_and_overrides():
    config = load_config(None, ["method.temperature=2", "train.seeds=[0, 1]", "data.labeled_fraction=[1.0, 0.1]",
                                "train.max_steps=null"])
    assert config.method.temperature == 2.0 and config.method.beta == 0.9
    assert config.train.seeds == [0, 1] and config.data.fractions == [1.0, 0.1]
    assert config.train.max_steps is None


def test_yaml_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {temperature: 3}\nstudent: {model: mlp-32}\n")
    config = load_config(path)
    assert config.method.temperature == 3 and config.student.model == "mlp-32"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.temprature=2", "Unknown parameter 'method.temprature' for method 'soft-target': did you mean "
                                   "'temperature'\\? its parameters are temperature, beta, kd_scale, standardize "
                                   "\\(in --set overrides\\)"),
        ("trian.epochs=3", "Unknown key 'trian' in --set overrides: did you mean 'train'?"),
        ("method.temperature=0", "'method.temperature' .* greater than 0; got 0"),
        ("method.temperature=-1", "'method.temperature' .* greater than 0; got -1"),
        ("method.beta=0", "'method.beta' .* greater than 0"),
        ("method.beta=1.5", "'method.beta' .* less than or equal to 1"),
        ("train.weight_decay=-0.1", "'train.weight_decay' .* greater than or equal to 0"),
        ("student.model=resnett", "student.model .* Unknown model 'resnett'"),
        ("teacher.model=mlp-", "teacher.model .* Unknown model 'mlp-'"),
        ("method.name=soft-targt", "did you mean 'soft-target'"),
        ("data.name=digitz", "did you mean 'digits'"),
        ("data.labeled_fraction=0", "labeled_fraction"),
        ("data.labeled_fraction=1.5", r"^The 'data.labeled_fraction' in --set overrides is invalid: must be in "
                                      r"\(0, 1\]; got 1.5\.$"),  # the value once
        ("data.labeled_fraction=[1.0,1.5]", r"invalid: each fraction must be in \(0, 1\], and 1.5 is not; "
                                            r"got \[1.0, 1.5\]\.$"),
        ("train.optimizer=adam", "'train.optimizer'"),
        ("noequals", "must look like section.key=value"),
    ],
)
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_yaml_typo_key_names_file_and_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epochs: 3\n  bacth_size: 32\n")
    with pytest.raises(ConfigError, match=r"Unknown key 'train.bacth_size' in .*typo.yaml: did you mean 'batch_size'\?"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listed)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), RunConfig)
