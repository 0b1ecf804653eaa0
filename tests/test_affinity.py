"""Which tasks help which: TAG's look-ahead affinity, data maps, the measured transfer matrix
and task grouping, on the tiny backbone and data."""

import copy
import csv
import json

import numpy as np
import pytest
import torch

from mtbert.config import ConfigError
from mtbert.data.batching import collate
from mtbert.experiments.report import write_report
from mtbert.lookahead import lookahead_affinity
from mtbert.training import Trainer

from conftest import tiny_config


def first_batches(trainer: Trainer) -> dict:
    return {name: collate(data.train, list(range(8)), trainer.tokenizer.pad_id)
            for name, data in trainer.data.items()}


def test_lookahead_affinity_equals_a_step_taken_by_hand(tmp_path, tiny_backbone, tiny_data):
    """Z_{i->j} = 1 - L_j(encoder stepped on i) / L_j(now), with the step applied by hand to a
    copy of the model: encoder only, plain gradient, no dropout."""
    trainer = Trainer(tiny_config(tiny_backbone, tiny_data, "model.hidden_dropout=0.3"),
                      tmp_path / "run")
    batches = first_batches(trainer)
    lr = 0.05

    def loss_of(model, task):
        return trainer.losses[task](model(task, batches[task]), batches[task].labels, 0)[0]

    trainer.model.train()
    before = copy.deepcopy(trainer.model.state_dict())
    measured = lookahead_affinity(trainer.model, batches,
                                  lambda t, out, b: trainer.losses[t](out, b.labels, 0)[0], lr)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.model.training  # back in the mode it was in

    for source in batches:
        model = copy.deepcopy(trainer.model).eval()
        loss_of(model, source).backward()
        with torch.no_grad():
            for p in model.encoder.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        unstepped = copy.deepcopy(trainer.model).eval()
        for target in batches:
            with torch.no_grad():
                expected = 1 - loss_of(model, target).item() / loss_of(unstepped, target).item()
            assert measured[source][target] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # A step on a task's own loss lowers it (lr small enough for a descent step).
    assert all(measured[t][t] > 0 for t in batches)


def test_affinity_logging_leaves_training_unchanged_and_logs_every_pair(
        tmp_path, tiny_backbone, tiny_data):
    """With dropout on: the look-ahead must not draw from the training random stream."""
    plain = tiny_config(tiny_backbone, tiny_data, "model.hidden_dropout=0.2", max_steps=4,
                        epochs=1)
    measured = tiny_config(tiny_backbone, tiny_data, "model.hidden_dropout=0.2",
                           "train.affinity_every=2", max_steps=4, epochs=1)
    a = Trainer(plain, tmp_path / "a")  # each seeds the global generator; fit before the next
    a.fit()
    b = Trainer(measured, tmp_path / "b")
    b.fit()
    assert a.state.first_losses == b.state.first_losses
    assert b.state.affinity_steps == 2  # steps 0 and 2
    record = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    tasks = ["sst", "quora", "sts"]
    assert sorted(record["affinity"]) == sorted(tasks)
    assert all(sorted(row) == sorted(tasks) for row in record["affinity"].values())
    assert "affinity" not in (tmp_path / "a" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("override", ["train.sampler=proportional", "tasks=[sst]"])
def test_affinity_needs_every_task_in_each_step(tiny_backbone, tiny_data, override):
    with pytest.raises(ConfigError, match="train.affinity_every"):
        tiny_config(tiny_backbone, tiny_data, "train.affinity_every=5", override)


# ---------------------------------------------------------------- data maps


def test_data_maps_hold_mean_and_std_of_the_gold_probability_over_passes(
        tmp_path, tiny_backbone, tiny_data, monkeypatch):
    """Two epochs over sst's 64 examples: each example is drawn twice, and its row holds the
    mean and population std of the two gold-label probabilities its training passes gave."""
    from mtbert.data_maps import DataMaps, read_data_map

    seen: dict[int, list[float]] = {}
    record = DataMaps.record

    def spy(self, task, predictions, labels, rows):
        if task == "sst":
            p = predictions.detach().float().softmax(-1)
            for row, label, probs in zip(rows.tolist(), labels.tolist(), p):
                seen.setdefault(row, []).append(float(probs[int(label)]))
        record(self, task, predictions, labels, rows)

    monkeypatch.setattr(DataMaps, "record", spy)
    config = tiny_config(tiny_backbone, tiny_data, "train.data_maps=true", tasks="[sst, sts]",
                         epochs=2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    folder = tmp_path / "run" / "data_maps"
    assert sorted(p.name for p in folder.iterdir()) == ["sst.csv"]  # sts: regression, no map
    columns = read_data_map(folder / "sst.csv")
    assert len(columns["row"]) == 64 and set(columns["passes"]) == {2.0}
    for row, confidence, variability in zip(columns["row"], columns["confidence"],
                                            columns["variability"]):
        probs = seen[int(row)]
        assert confidence == pytest.approx(np.mean(probs), abs=1e-6)
        assert variability == pytest.approx(np.std(probs), abs=1e-6)
    with open(folder / "sst.csv") as f:
        assert next(csv.reader(f)) == ["row", "confidence", "variability", "correctness",
                                       "passes"]
    trainer.save_training_state()  # the sums go on after a resume
    resumed = Trainer(config, tmp_path / "run")
    resumed.resume()
    saved = trainer.data_maps.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in resumed.data_maps.state_dict().items())
    page = write_report(tmp_path / "run").read_text()
    assert 'id="data-maps"' in page and "64 training examples, drawn 2 to 2 times" in page
    assert (tmp_path / "run" / "plots" / "data_map_sst.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- grouping


def test_partitions_are_every_set_partition_once():
    from mtbert.experiments.affinity import partitions

    def stirling(n, k):  # S(n, k): partitions of n items into k non-empty groups
        if n == k:
            return 1
        if k in (0, n + 1) or n == 0:
            return 0
        return k * stirling(n - 1, k) + stirling(n - 1, k - 1)

    items = list("abcde")
    for k in range(1, 6):
        found = [frozenset(frozenset(g) for g in p) for p in partitions(items, k)]
        assert len(found) == len(set(found)) == stirling(5, k)
        assert all(sorted(x for g in p for x in g) == items for p in found)


def test_grouping_picks_the_best_partition_of_a_given_matrix():
    """a and b help each other, c and d help each other, every cross pair hurts: the best
    two groups are {a, b} and {c, d}."""
    from mtbert.experiments.affinity import best_partition, group_score

    tasks = ["a", "c", "b", "d"]
    helps = {frozenset("ab"): 2.0, frozenset("cd"): 1.0}
    affinity = {s: {t: helps.get(frozenset((s, t)), -1.0) for t in tasks if t != s}
                for s in tasks}
    assert sorted(map(sorted, best_partition(tasks, affinity, 2))) == [["a", "b"], ["c", "d"]]
    assert group_score([["a", "b"], ["c", "d"]], affinity) == 6.0
    assert best_partition(tasks, affinity, 1) == [tasks]
    # A fifth task that helps a and b a lot and hurts c and d: joins {a, b} among 2 groups,
    # stays alone among 3 (its own loss, -1 from a and b, weighs less than a lone group's 0).
    affinity["e"] = {"a": 4.0, "b": 4.0, "c": -1.0, "d": -1.0}
    for t in tasks:
        affinity[t]["e"] = -1.0
    five = [*tasks, "e"]
    assert sorted(map(sorted, best_partition(five, affinity, 2))) == [["a", "b", "e"],
                                                                      ["c", "d"]]
    assert sorted(map(sorted, best_partition(five, affinity, 3))) == [["a", "b"], ["c", "d"],
                                                                      ["e"]]
    with pytest.raises(ConfigError, match="--groups"):
        best_partition(tasks, affinity, 5)


# ---------------------------------------------------------------- the measured matrix


def affinity_yaml(folder, backbone, max_steps=2, train=""):
    path = folder / "three.yaml"
    path.write_text(
        f"model: {{backbone: {backbone}, max_length: 32}}\n"
        "tasks: [sst, quora, sts]\n"
        "train: {epochs: 1, batch_size: 16, lr: 1.0e-3, warmup_ratio: 0.0, eval_batch_size: 64, "
        f"precision: fp32, max_steps: {'null' if max_steps is None else max_steps}{train}}}\n")
    return path


@pytest.mark.parametrize("budget", ["small", "full"])
def test_a_pair_trains_under_the_budget_rule_of_the_ablation_harness(tmp_path, tiny_backbone,
                                                                     tiny_data, budget):
    """Every pair row is the harness's plan of CONFIG's own recipe under the budget, and each
    of its tasks draws as many batches as CONFIG and the single-task rows draw of it, even
    where its own epochs are shorter: sst's batches of 4 make CONFIG's epoch 16 steps, quora
    and sts alone take 4."""
    from mtbert.experiments.ablation import plan_runs, train_sizes
    from mtbert.experiments.affinity import plan_configs
    from mtbert.experiments.budgets import planned_draws

    path = affinity_yaml(tmp_path, tiny_backbone, max_steps=None, train=", epochs: 2")
    out = tmp_path / "affinity"
    overrides = ["tasks.sst.batch_size=4"]
    files = plan_configs(path, out, str(tiny_data), overrides, budget=budget)
    assert [f.stem for f in files] == ["three", "sst.quora", "sst.sts", "quora.sts"]
    planned = plan_runs(files, budget, 2, out, str(tiny_data), single_task=True)
    harness = plan_runs([path], budget, 2, tmp_path / "ablate", str(tiny_data), overrides,
                        single_task=True)
    assert {r.name for r in planned if r.single_task_of} == {
        "three-only-sst", "three-only-quora", "three-only-sts"}

    def draws(run):
        return planned_draws(run.config, train_sizes(run.config))[1]

    for run in planned:
        # A single-task row is the harness's own; a pair is compared with CONFIG's row.
        (reference,) = [r for r in harness if r.seed_index == run.seed_index
                        and r.name == (run.name if run.single_task_of else "three")]
        expected = draws(reference)
        assert draws(run) == {t: expected[t] for t in draws(run)}
        ours, theirs = copy.deepcopy(run.config.train), copy.deepcopy(reference.config.train)
        for train in (ours, theirs):  # what a pair may differ in: its length, no look-ahead
            train.max_steps = train.epochs = train.affinity_every = None
        assert ours == theirs
        tasks = {t.name: t for t in reference.config.tasks}
        assert all(t == tasks[t.name] for t in run.config.tasks)
        if budget == "small":
            assert run.config.train.max_steps <= 60 and run.config.train.train_fraction == 0.1
    (pair,) = [r for r in planned if r.name == "quora.sts" and r.seed_index == 0]
    assert pair.config.train.epochs > 2  # past its own epochs, to draw the baseline's batches


def test_affinity_command_writes_both_matrices_groups_and_heat_maps(tmp_path, tiny_backbone,
                                                                   tiny_data, capsys):
    from scipy import stats

    from mtbert.cli import main
    from mtbert.experiments.report import read_metrics

    path = affinity_yaml(tmp_path, tiny_backbone)
    out = tmp_path / "affinity"
    argv = ["affinity", str(path), "--budget", "full", "--seeds", "2", "--every", "1",
            "--out", str(out), "--data-dir", str(tiny_data), "--no-report"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## Measured transfer" in printed and "## Groups chosen from the estimate" in printed
    table = (out / "affinity.md").read_text()
    assert table.startswith(f"<!-- mtbert {' '.join(argv)} -->")
    assert "†" not in table  # round robin, 2 steps: each task drew 32 examples everywhere

    def dev(name, k):
        return json.loads((out / name / f"seed-{k}" / "result.json").read_text())["dev"]

    saved = json.loads((out / "affinity.json").read_text())
    gain = np.mean([dev("quora.sts", k)["sts"] - dev("three-only-sts", k)["sts"]
                    for k in (0, 1)])
    assert saved["measured"]["quora"]["sts"] == pytest.approx(gain, abs=1e-9)
    z = np.mean([read_metrics(out / "three" / f"seed-{k}")[-1]["affinity"]["sst"]["quora"]
                 for k in (0, 1)])
    assert saved["estimate"]["sst"]["quora"] == pytest.approx(z)
    ordered = [(s, t) for s in saved["tasks"] for t in saved["tasks"] if s != t]
    rho = stats.spearmanr([saved["estimate"][s][t] for s, t in ordered],
                          [saved["measured"][s][t] for s, t in ordered])[0]
    assert saved["spearman"] == pytest.approx(rho, nan_ok=True)
    assert set(saved["groups"]) == {"measured", "estimate"}
    for partition in saved["groups"].values():
        assert sorted(t for g in partition for t in g) == sorted(saved["tasks"])
        assert len(partition) == 2
    for name in ("affinity-measured.png", "affinity-estimate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
