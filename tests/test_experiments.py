"""Ablations, budgets, run reports and the paper configs, on the tiny backbone and data."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mtbert.cli import main
from mtbert.config import ConfigError, load_config
from mtbert.evaluation import predict, predict_outputs
from mtbert.experiments import ablation
from mtbert.experiments.ablation import (
    format_count,
    format_score,
    plan_runs,
    run_ablation,
    write_results,
)
from mtbert.experiments.budgets import BUDGETS, get_budget
from mtbert.experiments.report import write_report
from mtbert.training import Trainer

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((REPO / "configs" / "papers").glob("*.yaml"))
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_yaml(folder: Path, name: str, backbone: Path, tasks: str = "[sst, quora, sts]",
              train: str = "", with_name: bool = True, max_steps: int | None = 2) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"# mtbert train --config {path.name}\n"
        + (f"name: {name}\n" if with_name else "")
        + f"model: {{backbone: {backbone}, max_length: 32}}\n"
        f"tasks: {tasks}\n"
        "train: {epochs: 1, batch_size: 16, lr: 1.0e-3, warmup_ratio: 0.0, eval_batch_size: 64, "
        f"max_steps: {'null' if max_steps is None else max_steps}"
        f"{', ' + train if train else ''}}}\n")
    return path


def results_of(out: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / name).glob("seed-*/result.json"))]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


# ---------------------------------------------------------------- ablate


def test_ablate_two_configs_two_seeds_tabulates_mean_and_std(tmp_path, tiny_backbone, tiny_data,
                                                             capsys):
    a = tiny_yaml(tmp_path, "a", tiny_backbone)
    b = tiny_yaml(tmp_path, "b", tiny_backbone, tasks="[sst, sts]", with_name=False)
    out = tmp_path / "ablation"
    assert main(["ablate", "--seeds", "2", "--budget", "full", "--out", str(out),
                 "--data-dir", str(tiny_data), str(a), str(b), "train.lr=2.0e-3"]) == 0
    assert "| Model configuration | SST Dev Acc |" in capsys.readouterr().out

    runs = {name: results_of(out, name) for name in ("a", "b")}  # b is named after its file
    assert [len(r) for r in runs.values()] == [2, 2]
    base = load_config(a).train.seed
    assert [r["seed"] for r in runs["a"]] == [base, base + 1]
    for result in runs["a"] + runs["b"]:
        assert {"config", "seed", "dev", "wall_time_s", "parameters", "steps"} <= result.keys()
        assert result["steps"] == 2 and result["parameters"]["total"] > 0
    assert (out / "a/seed-0/config.yaml").read_text().count("lr: 0.002") == 1  # override applied

    with open(out / "results.csv") as f:
        rows = {row["config"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["a", "b"]
    table = (out / "results.md").read_text()
    header = ("| Model configuration | SST Dev Acc | Paraphrase Dev Acc | STS Dev Corr | "
              "Overall Dev |")
    assert header in table
    for name, results in runs.items():
        row = rows[name]
        assert row["seeds"] == "2"
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        for column, task in enumerate(("sst", "quora", "sts", "overall"), start=1):
            values = [r["dev"][task] for r in results if task in r["dev"]]
            if not values:  # b has no quora task
                assert row[f"{task}_mean"] == "" and cells[column] == "–"
                continue
            mean, std = np.mean(values), np.std(values, ddof=1)
            assert float(row[f"{task}_mean"]) == pytest.approx(mean, abs=1e-6)
            assert float(row[f"{task}_std"]) == pytest.approx(std, abs=1e-6)
            assert cells[column] == f"{mean:.3f} ± {std:.3f}"
        assert float(row["wall_time_s"]) == pytest.approx(
            np.mean([r["wall_time_s"] for r in results]), abs=0.01)
    assert "Quora scores" not in table  # not the default backbone
    assert is_png(out / "results.png")
    for run in (out / name / f"seed-{k}" for name in "ab" for k in (0, 1)):  # a report per run
        images = re.findall(r'<img src="([^"]+)"', (run / "report.html").read_text())
        assert images and all(is_png(run / image) for image in images)


def test_ablate_resumes_without_redoing_finished_runs(tmp_path, tiny_backbone, tiny_data,
                                                      monkeypatch, capsys):
    a = tiny_yaml(tmp_path, "a", tiny_backbone)
    b = tiny_yaml(tmp_path, "b", tiny_backbone, train="weighting_options: {no_such_option: 1}")
    out = tmp_path / "ablation"
    args = ["ablate", str(a), str(b), "--seeds", "2", "--budget", "full", "--out", str(out),
            "--data-dir", str(tiny_data)]

    # First attempt: b crashes on its bad option; a finishes; the table has what finished.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 of 4 runs failed" in err and "no_such_option" in err
    assert (out / "b/seed-0/error.txt").is_file() and not (out / "b/seed-0/result.json").exists()
    assert "| a |" in (out / "results.md").read_text()
    assert "b/seed-0" in (out / "results.md").read_text()  # listed as failed

    # Interrupt a/seed-1: no result.json, a partial file left behind. Fix b.
    (out / "a/seed-1/result.json").unlink()
    (out / "a/seed-1/partial.tmp").write_text("half-written")
    b.write_text(b.read_text().replace(", weighting_options: {no_such_option: 1}", ""))
    finished = [out / "a/seed-0/result.json", out / "a/seed-0/metrics.jsonl"]
    mtimes = [p.stat().st_mtime_ns for p in finished]
    fitted = []
    original_fit = Trainer.fit

    def counting_fit(self):
        fitted.append(self.run_dir.relative_to(out).as_posix())
        return original_fit(self)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    outcome = run_ablation([a, b], budget="full", seeds=2, out=out, data_dir=str(tiny_data))
    assert fitted == ["a/seed-1", "b/seed-0", "b/seed-1"]
    assert [(r.name, r.seed_index) for r in outcome.skipped] == [("a", 0)]
    assert not outcome.failed
    assert [p.stat().st_mtime_ns for p in finished] == mtimes
    assert not (out / "a/seed-1/partial.tmp").exists()
    assert not (out / "a/seed-1/checkpoints").exists()  # resume checkpoints dropped when done
    assert all((out / f"{n}/seed-{k}/result.json").is_file() for n in "ab" for k in (0, 1))
    assert {r["config"] for r in outcome.results["b"]} == {"b"}

    # Everything finished: a re-run trains nothing, but writes a report that went missing.
    fitted.clear()
    (out / "a/seed-0/report.html").unlink()
    run_ablation([a, b], budget="full", seeds=2, out=out, data_dir=str(tiny_data))
    assert fitted == []
    assert (out / "a/seed-0/report.html").is_file()
    # Finished runs made with another config are not mixed into the table.
    with pytest.raises(ConfigError, match="train.lr"):
        plan_runs([a], budget="full", seeds=1, out=out, data_dir=str(tiny_data),
                  overrides=["train.lr=0.5"])


def test_results_table_single_seed_custom_tasks_and_quora_note(tmp_path):
    def result(config, dev, backbone="all-minilm-l6-v2"):
        tasks = {"cfimdb": {"metric": "accuracy", "kind": "classification", "preset": "cfimdb"},
                 "quora": {"metric": "accuracy", "kind": "classification", "preset": "quora"}}
        return {"config": config, "dev": dev, "tasks": {t: tasks[t] for t in dev if t in tasks},
                "backbone": backbone, "wall_time_s": 90.0, "steps": 60,
                "parameters": {"total": 22_713_601, "task_specific": 1_540, "encoder": 22_712_061}}

    files = write_results(tmp_path, {
        "x": [result("x", {"cfimdb": 0.81234, "quora": 0.7, "overall": 0.75617})]})
    table = files["md"].read_text()
    assert "| Model configuration | cfimdb Dev Acc | Paraphrase Dev Acc | Overall Dev |" in table
    assert "| x | 0.812 | 0.700 | 0.756 | – | – | 60 | 1 | 90 s | 22.7M / 1,540 |" in table
    assert ablation.QUORA_NOTE in table
    assert format_score(0.5, None) == "0.500" and format_score(0.5, 0.01) == "0.500 ± 0.010"
    no_quora = write_results(tmp_path / "2", {"y": [result("y", {"cfimdb": 0.8, "overall": 0.8})]})
    assert ablation.QUORA_NOTE not in no_quora["md"].read_text()
    assert is_png(files["png"])


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_every_budget_caps_steps_and_keeps_natural_task_shares(tmp_path, tiny_backbone,
                                                               tiny_data, budget):
    path = tiny_yaml(tmp_path, "a", tiny_backbone, max_steps=None)
    (run,) = plan_runs([path], budget=budget, seeds=1, out=tmp_path / "out",
                       data_dir=str(tiny_data))
    train = run.config.train
    spec = get_budget(budget)
    assert train.max_steps == spec.steps  # optimizer steps, whatever the sampler
    assert train.max_train_examples is None  # never equal sizes
    if budget == "full":
        assert train.train_fraction is None and train.max_eval_examples is None
        return
    assert train.max_eval_examples is not None
    (one_task,) = plan_runs([path], budget=budget, seeds=1, out=tmp_path / "out",
                            data_dir=str(tiny_data), overrides=["train.sampler=proportional"])
    assert one_task.config.train.max_steps == spec.steps
    # The user's overrides win over the budget's.
    (mine,) = plan_runs([path], budget=budget, seeds=1, out=tmp_path / "out",
                        data_dir=str(tiny_data),
                        overrides=["train.max_steps=7", "train.max_eval_examples=5"])
    assert (mine.config.train.max_steps, mine.config.train.max_eval_examples) == (7, 5)


def test_subsampling_keeps_each_tasks_share_and_dev_samples_are_shared():
    from mtbert.data.readers import Example
    from mtbert.data.tasks import subsample

    big = [Example(str(i), ("x",), 0.0) for i in range(1000)]
    small = big[:100]
    assert (len(subsample(big, fraction=0.1)), len(subsample(small, fraction=0.1))) == (100, 10)
    assert subsample(big, limit=50, seed=0) == subsample(big, limit=50, seed=0)
    assert subsample(big, limit=50, seed=0) != subsample(big, limit=50, seed=1)


def test_unknown_budget_is_a_clear_error(tmp_path, tiny_backbone, tiny_data, capsys):
    with pytest.raises(ConfigError, match=
                       "unknown budget 'huge'; known budgets: small, medium, large"):
        get_budget("huge")
    path = tiny_yaml(tmp_path, "a", tiny_backbone)
    assert main(["ablate", str(path), "--budget", "huge", "--out", str(tmp_path / "out"),
                 "--data-dir", str(tiny_data)]) == 2
    assert "mtbert ablate: error: unknown budget 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- report


def test_train_writes_a_report_with_every_section(tmp_path, tiny_backbone, tiny_data, capsys):
    config = tiny_yaml(tmp_path, "r", tiny_backbone,
                       train="epochs: 2, evals_per_epoch: 2", max_steps=None)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data-dir", str(tiny_data),
                 "--run-dir", str(run)]) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out

    assert main(["report", str(run), "--tensorboard"]) == 0
    captured = capsys.readouterr()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "TensorBoard is not installed" in captured.err
    else:  # read the event files back: every dev score of metrics.jsonl is there
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged = [(e.step, e.value) for e in events.Scalars("dev/overall")]
        expected = [(r["step"], r["dev"]["overall"]) for r in records if "dev" in r]
        assert len(logged) == len(expected) == 4  # 2 epochs x 2 evaluations
        assert all(a == b and abs(x - y) < 1e-6 for (a, x), (b, y) in zip(logged, expected))
        assert "train/sst/loss" in events.Tags()["scalars"]

    page = (run / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) >= 6
    for source in sources:
        assert not source.startswith(("/", "data:")) and is_png(run / source), source
    for section in ('id="config"', 'id="loss-curves"', 'id="dev-curves"', 'id="run-time"',
                    'id="parameters"', 'id="confusion-matrix-sst"',
                    'id="confusion-matrix-quora"', 'id="histogram-quora"', 'id="scatter-sts"'):
        assert section in page, section
    assert "backbone:" in page and "tasks:" in page  # the config YAML
    # The plotted dev examples give back the scores the run reported for its best model.
    best = json.loads((run / "best/metrics.json").read_text())["dev"]
    for task, metric in (("sst", "accuracy"), ("quora", "accuracy"), ("sts", "pearson")):
        assert f"32 dev examples; {metric} {best[task]:.4f}." in page
    smaller = write_report(run, max_examples=10).read_text()
    assert smaller.count("10 dev examples (a seeded subsample of 32)") == 3


@pytest.mark.parametrize("quora_loss", ["cross_entropy", "bce"])
def test_predict_outputs_are_probabilities_and_scores(tmp_path, tiny_backbone, tiny_data,
                                                      quora_loss):
    config = tiny_config(tiny_backbone, tiny_data, f"tasks.quora.loss={quora_loss}",
                         max_steps=1)
    trainer = Trainer(config, tmp_path / "run")
    for name, data in trainer.data.items():
        task = config.task(name)
        outputs = predict_outputs(trainer.model, name, data.dev, 64, trainer.tokenizer.pad_id)
        predictions = predict(trainer.model, name, data.dev, 64, trainer.tokenizer.pad_id)
        if task.kind == "classification":  # one logit (bce) or one per class: (N, C) either way
            assert outputs.shape == (len(data.dev), task.num_classes)
            np.testing.assert_allclose(outputs.sum(1), 1, rtol=1e-5)
            np.testing.assert_array_equal(outputs.argmax(1), predictions)
        else:
            assert outputs.shape == (len(data.dev),)
            low, high = task.label_range
            np.testing.assert_allclose(np.clip(outputs, low, high), predictions, rtol=1e-6)


# ---------------------------------------------------------------- paper configs

EXPECTED_PAPER_CONFIGS = (
    ["optimusbert-" + n for n in (
        "baseline", "cosine-mnrl", "threshold-mnrl", "multitask", "multitask-pcgrad",
        "cosine-mnrl-multitask-pcgrad", "threshold-mnrl-multitask-pcgrad",
        "homerun-uncertainty-dropout", "homerun-hidden-layers")]
    + ["tea-bert-baseline-sst", "tea-bert-baseline-all"]
    + [f"tea-bert-{v}-wd{wd}" for v in ("input", "attention", "projected", "elu", "tanh", "selu")
       for wd in ("0.000", "0.001", "0.010")]
    + ["chen-siamese-pcgrad"])


def test_there_is_a_paper_config_per_table_row():
    assert sorted(p.stem for p in PAPER_CONFIGS) == sorted(EXPECTED_PAPER_CONFIGS)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_paper_config_loads_and_builds(path, tiny_backbone):
    from mtbert.balancing import TaskContext, build_combiner, build_weighting
    from mtbert.model_folder import build_model
    from mtbert.training import load_backbone

    lines = path.read_text().splitlines()
    assert lines[0] == f"# mtbert train --config configs/papers/{path.name}"
    assert re.match(r"# (OptimusBERT|TEA-BERT|Chen & Hanley) report \(\S+\.txt\)", lines[1])
    assert "model.backbone=bert-base-uncased" in path.read_text()
    config = load_config(path)
    assert config.name == path.stem and config.model.backbone == "all-minilm-l6-v2"
    config = load_config(path, [f"model.backbone={tiny_backbone}", "model.max_length=32"])
    encoder, _ = load_backbone(config)
    try:
        model = build_model(config, encoder)
    except ConfigError as error:
        if "unknown variant" in str(error):
            pytest.skip(f"conditioning {config.model.conditioning!r} is not registered yet")
        raise
    assert set(model.heads) == {t.name for t in config.tasks}
    context = TaskContext(tuple(t.name for t in config.tasks),
                          {t.name: t.kind for t in config.tasks},
                          {t.name: t.weight for t in config.tasks}, config.train.seed)
    build_weighting(config.train.weighting, context, **config.train.weighting_options)
    build_combiner(config.train.combiner, context)
    load_config(path, list(BUDGETS["small"].overrides))


# ---------------------------------------------------------------- comparisons


def test_paired_interval_and_delta_m_equal_hand_computation():
    from scipy import stats

    from mtbert.experiments.ablation import delta_m, paired_interval

    diffs = [0.019, 0.021, 0.020]
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    interval = paired_interval(diffs)
    assert (interval.mean, interval.low, interval.high) == pytest.approx(
        (0.02, 0.02 - half, 0.02 + half))
    assert not interval.tie and paired_interval([0.01, -0.02, 0.0]).tie
    assert paired_interval([0.5]).format() == "+0.500 (1 seed)"
    # Δm: mean relative gain, (0.55 - 0.5) / 0.5 = +10% and (0.72 - 0.8) / 0.8 = -10%.
    assert delta_m({"a": 0.55, "b": 0.72}, {"a": 0.5, "b": 0.8}) == pytest.approx(0.0)
    assert delta_m({"a": 0.6}, {"a": 0.5}) == pytest.approx(0.2)


def test_ablate_single_task_rows_delta_m_intervals_and_no_op_flag(tmp_path, tiny_backbone,
                                                                  tiny_data, capsys):
    base = tiny_yaml(tmp_path, "base", tiny_backbone, max_steps=3)
    twin = tiny_yaml(tmp_path, "twin", tiny_backbone, max_steps=3)  # trains exactly like base
    other = tiny_yaml(tmp_path, "other", tiny_backbone, train="lr: 5.0e-3", max_steps=3)
    out = tmp_path / "ablation"
    assert main(["ablate", str(base), str(twin), str(other), "--single-task", "--seeds", "2",
                 "--budget", "full", "--out", str(out), "--data-dir", str(tiny_data),
                 "--no-report"]) == 0
    capsys.readouterr()
    alone = {t: results_of(out, f"base-only-{t}") for t in ("sst", "quora", "sts")}
    assert all(len(runs) == 2 and set(runs[0]["tasks"]) == {t} for t, runs in alone.items())
    assert all(r["single_task_of"] == "base" for runs in alone.values() for r in runs)
    other_runs = results_of(out, "other")
    assert other_runs[0]["examples_seen"] == {"sst": 48, "quora": 48, "sts": 48}  # 3 x 16

    with open(out / "results.csv") as f:
        rows = {row["config"]: row for row in csv.DictReader(f)}
    # Δm% of `other`, seed by seed, against the single-task rows of the same seed.
    expected = [100 * np.mean([(other_runs[k]["dev"][t] - alone[t][k]["dev"][t])
                               / abs(alone[t][k]["dev"][t]) for t in alone]) for k in (0, 1)]
    assert float(rows["other"]["delta_m_percent"]) == pytest.approx(np.mean(expected), abs=1e-5)
    base_runs = results_of(out, "base")
    vs_base = [other_runs[k]["dev"]["overall"] - base_runs[k]["dev"]["overall"] for k in (0, 1)]
    assert float(rows["other"]["overall_vs_baseline"]) == pytest.approx(np.mean(vs_base),
                                                                        abs=1e-6)
    assert rows["twin"]["same_first_losses_as_baseline"] == "True"
    assert rows["other"]["same_first_losses_as_baseline"] == "False"
    table = (out / "results.md").read_text()
    assert "Δ overall vs base [95% CI]" in table and "Δm% vs single-task [95% CI]" in table
    assert rows["twin"]["identical_to_baseline"] == "True"
    assert "| twin ⚠ identical to the baseline |" in table
    assert "sst vs alone (points)" in table


def test_a_row_that_starts_like_the_baseline_but_ends_elsewhere_is_told_apart():
    """DWA's first epochs weight every task 1, as the summed baseline does: its first steps'
    losses equal the baseline's, but it acts later, so it is not flagged as identical."""
    from mtbert.experiments.ablation import Row, compare

    def row(name, first, dev):
        return Row(name, 1, {}, 0.0, 0.0, 10, {}, "b", {"sst": {}},
                   by_seed={0: {"sst": dev, "overall": dev}}, first_objectives={0: first})

    baseline, late, twin, other = (row("base", [1.0], 0.5), row("late", [1.0], 0.6),
                                   row("twin", [1.0], 0.5), row("other", [0.9], 0.5))
    compare([baseline, late, twin, other])
    assert (late.same_as_baseline, late.identical_to_baseline) == (True, False)
    assert (twin.same_as_baseline, twin.identical_to_baseline) == (True, True)
    assert (other.same_as_baseline, other.identical_to_baseline) == (False, False)


def test_a_row_on_other_tasks_is_not_compared_by_overall_score():
    """Overall averages the tasks a config trains: an STS-only row's overall ((r + 1) / 2)
    against a three-task baseline's is no comparison; its STS gain over STS alone is."""
    from mtbert.experiments.ablation import Column, Row, compare, markdown_table

    def row(name, tasks, dev, single_task_of=None):
        return Row(name, 2, {}, 0.0, 0.0, 10, {"total": 1, "task_specific": 1}, "b",
                   {t: {} for t in tasks}, by_seed={k: dev for k in (0, 1)},
                   single_task_of=single_task_of)

    baseline = row("base", ("sst", "sts"), {"sst": 0.4, "sts": 0.8, "overall": 0.65})
    sts_only = row("sts-loss", ("sts",), {"sts": 0.85, "overall": 0.925})
    alone = row("base-only-sts", ("sts",), {"sts": 0.82, "overall": 0.91}, "base")
    compare([baseline, sts_only, alone])
    assert sts_only.vs_baseline is None and sts_only.other_tasks
    assert sts_only.task_gains["sts"].mean == pytest.approx(0.03)
    table = markdown_table([baseline, sts_only, alone], [Column("overall", "Overall Dev")])
    assert "– (other tasks)" in table.splitlines()[3]


def test_ablate_merged_rows_and_a_student_of_the_single_task_runs(tmp_path, tiny_backbone,
                                                                  tiny_data, capsys):
    base = tiny_yaml(tmp_path, "base", tiny_backbone, max_steps=3)
    student = tiny_yaml(tmp_path, "student", tiny_backbone, max_steps=3)
    student.write_text(student.read_text() + "distill: {teachers: {sst: single-task, "
                                              "sts: single-task}}\n")
    out = tmp_path / "one-model"
    assert main(["ablate", str(base), str(student), "--single-task", "--seeds", "1",
                 "--merge", "average", "ties", "--budget", "full", "--out", str(out),
                 "--data-dir", str(tiny_data), "--no-report"]) == 0
    capsys.readouterr()
    saved = load_config(out / "student" / "seed-0" / "config.yaml")
    assert saved.distill.teachers == {t: str(out / f"base-only-{t}" / "seed-0")
                                      for t in ("sst", "sts")}
    alone = {t: results_of(out, f"base-only-{t}")[0] for t in ("sst", "quora", "sts")}
    merged = results_of(out, "base-merged-ties")[0]
    assert merged["train_time_s"] == pytest.approx(sum(r["train_time_s"] for r in alone.values()),
                                                   abs=0.02)
    assert set(merged["dev"]) == {"sst", "quora", "sts", "overall"}
    from mtbert.model_folder import load_model
    model, _, _ = load_model(out / "base-merged-average" / "seed-0")
    sst, _, _ = load_model(out / "base-only-sst" / "seed-0")
    for key, value in model.heads["sst"].state_dict().items():
        assert np.array_equal(value.numpy(), sst.heads["sst"].state_dict()[key].numpy())
    with open(out / "results.csv") as f:
        rows = {row["config"] for row in csv.DictReader(f)}
    assert {"base-merged-average", "base-merged-ties", "student"} <= rows
    with pytest.raises(ConfigError, match="--merge merges the single-task runs"):
        plan_runs([base], "full", 1, out, str(tiny_data), merges=["ties"])


# ---------------------------------------------------------------- issue 39: equal evidence

def test_single_task_rows_draw_the_examples_the_baseline_drew(tmp_path, tiny_backbone,
                                                              tiny_data, capsys):
    """Proportional sampling draws ~2 batches of each task in 6 steps; each task alone trains
    its own epoch (4 batches) under the old rule, the baseline's draws under the new one."""
    base = tiny_yaml(tmp_path, "base", tiny_backbone, train="sampler: proportional",
                     max_steps=6)
    out = tmp_path / "ablation"
    args = [str(base), "--single-task", "--seeds", "2", "--budget", "full", "--out", str(out),
            "--data-dir", str(tiny_data)]
    assert main(["ablate", *args, "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "| base-only-sst |" in plan and not any(out.rglob("result.json"))
    assert main(["ablate", *args, "--no-report"]) == 0
    capsys.readouterr()
    joint = results_of(out, "base")
    assert [r["examples_seen"] for r in joint] != [{t: 32 for t in ("sst", "quora", "sts")}] * 2
    for task in ("sst", "quora", "sts"):
        alone = results_of(out, f"base-only-{task}")
        assert [r["examples_seen"] for r in alone] == [{task: r["examples_seen"][task]}
                                                       for r in joint]
        seen = np.mean([r["examples_seen"][task] for r in joint])
        assert f"| base-only-{task} | 6" not in plan  # the plan's examples are the new rule's
        assert f"{task} {format_count(round(seen))}" in plan


def test_every_row_is_scored_at_its_last_step_by_one_stated_rule(tmp_path, tiny_backbone,
                                                                 tiny_data):
    """Several evaluations per run; the score is the last one's, whichever was best."""
    config = tiny_yaml(tmp_path, "a", tiny_backbone, train="evals_per_epoch: 4", max_steps=4)
    out = tmp_path / "ablation"
    outcome = run_ablation([config], budget="full", seeds=2, out=out, data_dir=str(tiny_data),
                           report=False)
    for run in outcome.results["a"]:
        records = [json.loads(line) for line in
                   (out / "a" / f"seed-{run['seed_index']}" / "metrics.jsonl").open()]
        assert len(records) == 4 and run["selection"] == "last"
        assert run["dev"] == records[-1]["dev"] and run["dev_step"] == records[-1]["step"] == 4
    assert "Selection, the same for every row: each run's dev scores at its last step." in (
        out / "results.md").read_text()
    older = dict(outcome.results["a"][0], config="b")
    del older["selection"]  # a run of older code: best overall dev score on the scored sample
    with pytest.raises(ablation.AblationError, match="different rules"):
        write_results(tmp_path / "mixed", {**outcome.results, "b": [older]})


def test_a_row_that_logs_one_more_key_but_backpropagates_the_same_is_flagged(tmp_path):
    """BAM!'s student logs `teacher_loss`; with no effect its back-propagated loss is the
    baseline's on every seed. A row that differs on one seed only did act."""
    def result(name, dev, first):
        return [{"config": name, "seed": k, "seed_index": k, "selection": "last", "steps": 3,
                 "dev": {"sst": dev, "overall": dev}, "wall_time_s": 1.0, "backbone": "b",
                 "tasks": {"sst": {"metric": "accuracy", "kind": "classification"}},
                 "parameters": {"total": 1, "task_specific": 1},
                 "first_losses": [{"sst/loss": loss, "backward_loss": loss, **extra}
                                  for loss in first[k]]}
                for k, extra in enumerate(({}, {}))]

    same = {0: [1.0, 0.9], 1: [1.1, 1.0]}
    student = result("student", 0.5, same)
    for run in student:
        run["first_losses"] = [{**step, "sst/teacher_loss": 0.3} for step in run["first_losses"]]
    later = result("later", 0.5, {0: same[0], 1: [1.1, 0.95]})
    write_results(tmp_path, {"base": result("base", 0.5, same), "student": student,
                             "later": later})
    with open(tmp_path / "results.csv") as f:
        rows = {row["config"]: row for row in csv.DictReader(f)}
    assert rows["student"]["identical_to_baseline"] == "True"
    assert rows["later"]["same_first_losses_as_baseline"] == "False"
    assert "| student ⚠ identical to the baseline |" in (tmp_path / "results.md").read_text()


def test_a_run_made_by_other_code_is_trained_again(tmp_path, tiny_backbone, tiny_data,
                                                   monkeypatch):
    config = tiny_yaml(tmp_path, "a", tiny_backbone)
    out = tmp_path / "ablation"
    run_ablation([config], budget="full", seeds=2, out=out, data_dir=str(tiny_data),
                 report=False)
    code = results_of(out, "a")[0]["code"]
    assert code == ablation.code_version() and {"commit", "dirty", "torch"} <= code.keys()
    assert json.loads((out / "a/seed-0/run.json").read_text())["code"] == code
    assert results_of(out, "a")[0]["precision"] in ("fp32", "bf16")
    stale = out / "a/seed-1/result.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()),
                                 "code": {**code, "commit": "0" * 40, "source": "other"}}))
    fitted = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fitted.append(self.run_dir) or
                        original_fit(self))
    outcome = run_ablation([config], budget="full", seeds=2, out=out,
                           data_dir=str(tiny_data), report=False)
    assert fitted == [out / "a/seed-1"] and [r.seed_index for r in outcome.skipped] == [0]
    assert results_of(out, "a")[1]["code"] == code
    with open(out / "results-per-seed.csv") as f:
        assert [row["source"] for row in csv.DictReader(f)] == [code["source"]] * 2


def test_no_delta_m_where_a_single_task_score_is_zero():
    """A model that predicts one class scores MCC 0 alone (CoLA at the small budget): the
    relative gain over it is undefined, so the row shows no Δm% but each task's gain."""
    from mtbert.experiments.ablation import Row, compare

    def row(name, tasks, dev, single_task_of=None):
        return Row(name, 2, {}, 0.0, 0.0, 10, {"total": 1, "task_specific": 1}, "b",
                   {t: {} for t in tasks}, by_seed={k: dev for k in (0, 1)},
                   single_task_of=single_task_of)

    joint = row("joint", ("cola", "sst"), {"cola": 0.1, "sst": 0.5, "overall": 0.3})
    cola = row("joint-only-cola", ("cola",), {"cola": 0.0, "overall": 0.0}, "joint")
    sst = row("joint-only-sst", ("sst",), {"sst": 0.4, "overall": 0.4}, "joint")
    compare([joint, cola, sst])
    assert joint.delta_m is None
    assert joint.task_gains["cola"].mean == pytest.approx(0.1)
    assert joint.task_gains["sst"].mean == pytest.approx(0.1)


# ---------------------------------------------------------------- issue 40: two-stage row

def test_two_stage_row_fine_tunes_each_task_from_the_baseline_and_teaches_a_student(
        tmp_path, tiny_backbone, tiny_data, capsys):
    """MT-DNN's recipe as a row: each task fine-tuned from the baseline's run of its seed,
    drawing what the task's single-task row draws; the row scores each task with its own
    model and counts every model's compute and parameters; its models can teach a student,
    which trains after them."""
    base = tiny_yaml(tmp_path, "base", tiny_backbone, tasks="[sst, sts]", max_steps=3)
    student = tiny_yaml(tmp_path, "student", tiny_backbone, tasks="[sst, sts]", max_steps=3)
    student.write_text(student.read_text() + "distill: {teachers: {sst: two-stage, "
                                              "sts: two-stage}}\n")
    out = tmp_path / "two-stage"
    planned = plan_runs([base, student], "full", 1, out, str(tiny_data), single_task=True,
                        two_stage=True)
    order = [run.name for run in planned]
    assert order.index("student") > max(order.index("base-two-stage-sst"),
                                        order.index("base-two-stage-sts"))
    assert order.index("base-two-stage") > order.index("base-two-stage-sts")
    assert main(["ablate", str(base), str(student), "--single-task", "--two-stage", "--seeds",
                 "1", "--budget", "full", "--out", str(out), "--data-dir", str(tiny_data),
                 "--no-report"]) == 0
    capsys.readouterr()
    stage_one = results_of(out, "base")[0]
    row = results_of(out, "base-two-stage")[0]
    parts = {t: results_of(out, f"base-two-stage-{t}")[0] for t in ("sst", "sts")}
    for task, part in parts.items():
        saved = load_config(out / f"base-two-stage-{task}" / "seed-0" / "config.yaml")
        assert saved.adapt.from_run == str(out / "base" / "seed-0")
        assert saved.adapt.finetune == task and [t.name for t in saved.tasks] == [task]
        alone = results_of(out, f"base-only-{task}")[0]
        assert part["examples_seen"] == alone["examples_seen"]
        assert row["dev"][task] == part["dev"][task]
    assert row["steps"] == stage_one["steps"] + sum(p["steps"] for p in parts.values())
    assert row["examples_seen"] == {t: stage_one["examples_seen"][t]
                                    + parts[t]["examples_seen"][t] for t in parts}
    assert row["parameters"]["total"] == sum(p["parameters"]["total"] for p in parts.values())
    pearson = (row["dev"]["sts"] + 1) / 2
    assert row["dev"]["overall"] == pytest.approx((row["dev"]["sst"] + pearson) / 2)
    assert load_config(out / "student" / "seed-0" / "config.yaml").distill.teachers == {
        t: str(out / f"base-two-stage-{t}" / "seed-0") for t in ("sst", "sts")}
    with open(out / "results.csv") as f:
        rows = [r["config"] for r in csv.DictReader(f)]
    assert "base-two-stage" in rows and not any(r.startswith("base-two-stage-") for r in rows)
    with pytest.raises(ConfigError, match="'two-stage' needs --two-stage"):
        plan_runs([base, student], "full", 1, tmp_path / "other", str(tiny_data),
                  single_task=True)


def test_two_stage_with_a_config_fine_tunes_under_its_settings(tmp_path, tiny_backbone,
                                                                tiny_data):
    """`--two-stage CONFIG`: stage two takes CONFIG's training settings (MT-DNN's short
    fine-tune), under the budget's cap, with the seed of the run it starts from and scored on
    its dev sample; a setting that cannot act on one task is refused naming the fine-tune."""
    base = tiny_yaml(tmp_path, "base", tiny_backbone, tasks="[sst, sts]", max_steps=6)
    short = tiny_yaml(tmp_path, "short", tiny_backbone, tasks="[sst]", max_steps=None,
                      train="lr: 2.0e-5, head_lr: 3.0e-5, seed: 99, max_eval_examples: 7")
    out = tmp_path / "two-stage"
    planned = {(r.name, r.seed_index): r for r in plan_runs(
        [base], "small", 2, out, str(tiny_data), single_task=True, two_stage=short)}
    for k in (0, 1):
        stage_one = planned[("base", k)]
        for task in ("sst", "sts"):
            config = planned[(f"base-two-stage-{task}", k)].config
            assert (config.train.lr, config.train.head_lr) == (2.0e-5, 3.0e-5)
            assert config.train.seed == stage_one.config.train.seed
            assert config.train.max_eval_examples == stage_one.config.train.max_eval_examples
            assert config.train.max_steps == get_budget("small").steps  # CONFIG has none
            assert config.adapt.from_run == str(stage_one.run_dir)
            assert [t.name for t in config.tasks] == [task]
            assert config.tasks[0] == stage_one.config.task(task)
    drawing = plan_runs([base], "small", 1, out, str(tiny_data), single_task=True,
                        two_stage=True)
    assert next(r for r in drawing if r.name == "base-two-stage-sst").config.train.lr == 1.0e-3
    weighted = tiny_yaml(tmp_path, "weighted", tiny_backbone, train="weighting: gradnorm")
    with pytest.raises(ConfigError, match="--finetune sst trains sst alone: train.weighting"):
        plan_runs([base], "small", 1, out, str(tiny_data), single_task=True,
                  two_stage=weighted)


def test_a_run_whose_stage_one_failed_waits_instead_of_failing_obscurely(
        tmp_path, tiny_backbone, tiny_data, monkeypatch):
    base = tiny_yaml(tmp_path, "base", tiny_backbone, tasks="[sst, sts]", max_steps=2)
    out = tmp_path / "waits"
    original = ablation.run_one

    def fails_for_the_baseline(run, budget):
        if run.name == "base":
            raise RuntimeError("out of memory")
        return original(run, budget)

    monkeypatch.setattr(ablation, "run_one", fails_for_the_baseline)
    outcome = run_ablation([base], budget="full", seeds=1, out=out, data_dir=str(tiny_data),
                           report=False, two_stage=True)
    failed = {run.name: message for run, message in outcome.failed}
    assert failed["base"] == "RuntimeError: out of memory"
    assert failed["base-two-stage-sst"].startswith(f"waits for {out / 'base' / 'seed-0'}")
    assert "waits for" in failed["base-two-stage"]
    assert not (out / "base-two-stage-sst" / "seed-0").exists()
