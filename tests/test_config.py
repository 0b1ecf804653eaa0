"""Configs: every YAML loads; unknown keys and wrong types are named; overrides and presets."""

from pathlib import Path

import pytest

from mtbert.config import ConfigError, ExperimentConfig, TaskConfig, load_config
from mtbert.techniques import check_techniques

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_in_the_repo_loads(path):
    config = load_config(path)
    check_techniques(config)
    assert isinstance(config, ExperimentConfig) and config.tasks
    assert path.read_text().startswith("#"), "each config starts with a comment (the command)"


def test_default_config_is_the_trio_on_the_embedded_backbone():
    config = load_config(Path(__file__).resolve().parents[1] / "configs/default.yaml")
    assert [t.name for t in config.tasks] == ["sst", "quora", "sts"]
    assert config.model.backbone == "all-minilm-l6-v2"
    sst = config.task("sst")
    assert isinstance(sst, TaskConfig) and sst.num_classes == 5 and sst.kind == "classification"
    assert config.task("sts").label_range == [0.0, 5.0]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(write(tmp_path, "tasks: [sst]\ntrain: {lrr: 1}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, "tasks: [sst]\ntrain: {lr: fast}\n"))
    with pytest.raises(ConfigError, match=r"tasks\[0\] \(sst\)\.head\.type: unknown 'magic'; "
                                          r"registered: classifier, cosine, pair_features"):
        check_techniques(load_config(write(tmp_path,
                                           "tasks: [{preset: sst, head: {type: magic}}]\n")))


def test_unknown_preset_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'sstt'"):
        load_config(write(tmp_path, "tasks: [sstt]\n"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, "tasks: [sst]\n"), ["train.lr"])
    with pytest.raises(ConfigError, match="no task named 'nope'"):
        load_config(write(tmp_path, "tasks: [sst]\n"), ["tasks.nope.weight=2"])


def test_overrides_reach_nested_keys_and_tasks_by_name(tmp_path):
    config = load_config(write(tmp_path, "tasks: [sst, sts]\n"),
                         ["train.lr=3e-5", "tasks.sts.head.type=cosine", "tasks.sst.weight=2",
                          "train.weighting=static"])
    assert config.train.lr == 3e-5
    assert config.task("sts").head.type == "cosine"
    assert config.task("sst").weight == 2.0


def test_user_task_without_code(tmp_path):
    config = load_config(write(tmp_path, """
tasks:
  - name: nli
    text_columns: [premise, hypothesis]
    label_column: label
    kind: classification
    num_classes: 3
    train_file: nli.jsonl
    head: {type: pair_features, pooling: mean}
"""))
    task = config.task("nli")
    assert task.is_pair and task.head.features == ["u", "v", "abs_diff", "product"]


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="encodes the two sentences of a pair apart"):
        check_techniques(load_config(write(tmp_path,
                                           "tasks: [{preset: sst, head: {type: cosine}}]\n")))
    with pytest.raises(ConfigError, match="label_range"):
        load_config(write(tmp_path, "tasks: [{name: r, kind: regression, train_file: x}]\n"))


def test_extends_merges_mappings_and_tasks_by_name(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\ntasks:\n  - {preset: sst, head: {pooling: mean}}\n  - preset: sts\n"
        "train: {lr: 1.0e-4, epochs: 2}\n")
    child = write(tmp_path, "extends: base.yaml\nname: child\ntrain: {lr: 3.0e-5}\n"
                            "tasks:\n  - {name: sst, head: {hidden_layers: 2}}\n  - quora\n")
    config = load_config(child)
    assert config.name == "child" and config.train.lr == 3e-5 and config.train.epochs == 2
    assert [t.name for t in config.tasks] == ["sst", "sts", "quora"]
    sst = config.task("sst")
    assert sst.head.pooling == "mean" and sst.head.hidden_layers == 2 and sst.num_classes == 5


def test_extends_loop_and_unnamed_task_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "base.yaml").write_text("tasks: [sst]\n")
    with pytest.raises(ConfigError, match="names its tasks"):
        load_config(write(tmp_path, "extends: base.yaml\ntasks:\n  - {head: {dropout: 0.2}}\n"))
