"""Model merging: each method equals a hand-computed result on small tensors; `mtbert merge`
builds one model folder with every run's heads."""

import pytest
import torch

from mtbert.cli import main
from mtbert.merging import average, task_arithmetic, ties, trim
from mtbert.model_folder import load_model
from mtbert.training import train_and_evaluate

from conftest import tiny_config


def test_average_is_the_mean_of_the_runs():
    merged = average(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
    assert torch.equal(merged, torch.tensor([2.0, 3.0]))


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    base = torch.tensor([1.0, 1.0])
    # task vectors [1, -1] and [3, 0]; sum [4, -1]; half of it added to the base
    merged = task_arithmetic(base, [torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0])], 0.5)
    assert torch.equal(merged, torch.tensor([3.0, 0.5]))


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(trim(torch.tensor([3.0, -1.0, 0.5, -2.0]), 0.5),
                       torch.tensor([3.0, 0.0, 0.0, -2.0]))
    assert torch.equal(trim(torch.tensor([1.0, -4.0, 2.0]), 0.2), torch.tensor([0.0, -4.0, 0.0]))


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    base = torch.ones(4)
    vectors = [torch.tensor([3.0, -1.0, 0.5, -2.0]),  # trimmed (top 2): [3, 0, 0, -2]
               torch.tensor([-1.0, 2.0, 0.2, -3.0]),  # [0, 2, 0, -3]
               torch.tensor([2.0, -2.5, -0.1, 1.0])]  # [2, -2.5, 0, 0]
    # sums [5, -0.5, 0, -5] -> signs [+, -, 0, -]; agreeing entries: {3, 2}, {-2.5}, {}, {-2, -3}
    # disjoint means [2.5, -2.5, 0, -2.5]; half of it added to the base
    merged = ties(base, [base + v for v in vectors], scale=0.5, density=0.5)
    assert torch.equal(merged, torch.tensor([2.25, -0.25, 1.0, -0.25]))


@pytest.fixture(scope="module")
def two_runs(tiny_backbone, tiny_data, tmp_path_factory):
    """Two single-task runs fine-tuned from the same tiny backbone."""
    root = tmp_path_factory.mktemp("merge")
    for task in ("sst", "sts"):
        train_and_evaluate(tiny_config(tiny_backbone, tiny_data, tasks=f"[{task}]",
                                       max_steps=3), root / task, splits=("dev",))
    return root / "sst", root / "sts"


def test_merge_command_keeps_every_head_and_merges_the_encoders(two_runs, tmp_path, capsys):
    sst, sts = two_runs
    out = tmp_path / "merged"
    assert main(["merge", str(sst), str(sts), "--method", "average", "--out", str(out)]) == 0
    merged, _, config = load_model(out)
    assert [t.name for t in config.tasks] == ["sst", "sts"]
    (sst_model, _, _), (sts_model, _, _) = load_model(sst), load_model(sts)
    for key, value in merged.encoder.state_dict().items():
        expected = (sst_model.encoder.state_dict()[key] + sts_model.encoder.state_dict()[key]) / 2
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    for task, source in (("sst", sst_model), ("sts", sts_model)):
        for key, value in merged.heads[task].state_dict().items():
            assert torch.equal(value, source.heads[task].state_dict()[key]), (task, key)
    assert main(["evaluate", str(out)]) == 0
    assert "sts" in capsys.readouterr().out


def test_merge_refuses_clashing_tasks(two_runs, tmp_path, capsys):
    sst, _ = two_runs
    assert main(["merge", str(sst), str(sst), "--method", "ties", "--out",
                 str(tmp_path / "m")]) == 2
    assert "task names must differ" in capsys.readouterr().err


@pytest.mark.parametrize("method, option, message", [
    ("average", ["--scale", "2"], "--scale applies to task-arithmetic and ties, not average"),
    ("average", ["--density", "0.5"], "--density applies to ties, not average"),
    ("task-arithmetic", ["--density", "0.5"], "--density applies to ties, not task-arithmetic"),
])
def test_merge_refuses_options_its_method_ignores(two_runs, tmp_path, capsys, method, option,
                                                  message):
    """Two runs that merge fine without the option: only the option is refused."""
    sst, sts = two_runs
    out = tmp_path / "m"
    assert main(["merge", str(sst), str(sts), "--method", method, *option, "--out",
                 str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"mtbert merge: error: {message}"
    assert not out.exists()
    assert main(["merge", str(sst), str(sts), "--method", method, "--out", str(out)]) == 0


def test_mixture_of_experts_runs_merge_from_the_upcycled_backbone(tiny_backbone, tiny_data,
                                                                  tmp_path):
    """Every run's experts and gates started as the upcycled backbone's: that is theta_0."""
    runs = []
    for task in ("sst", "sts"):
        runs.append(tmp_path / task)
        train_and_evaluate(tiny_config(tiny_backbone, tiny_data, "model.moe={experts: 2, "
                                       "every: 1}", tasks=f"[{task}]", max_steps=2),
                           runs[-1], splits=())
    out = tmp_path / "merged"
    assert main(["merge", *map(str, runs), "--method", "average", "--out", str(out)]) == 0
    merged = load_model(out)[0].encoder.state_dict()
    sst, sts = (load_model(run)[0].encoder.state_dict() for run in runs)
    assert merged.keys() == sst.keys() and any("expert" in key for key in merged)
    for key, value in merged.items():
        torch.testing.assert_close(value, (sst[key] + sts[key]) / 2, rtol=0, atol=1e-7)
