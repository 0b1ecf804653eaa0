"""Teacher-annealed distillation (BAM!): at lambda 0 the loss is the teacher loss, at lambda 1
the gold loss, in between their mix (whose gradient is that of BAM!'s mixed target); teachers
are runs or prediction files; `mtbert distill` trains a student."""

import json

import pytest
import torch
import torch.nn.functional as F

from mtbert.cli import main
from mtbert.config import load_config
from mtbert.distillation import TeacherAnnealing, teacher_targets
from mtbert.training import Trainer

from conftest import tiny_config

SST = load_config(None, ["tasks=[sst, sts, quora]"]).tasks
TASKS = {t.name: t for t in SST}


def losses_at(annealing, task, outputs, labels, rows, progress):
    gold = annealing.losses[task](outputs, labels)
    loss, logged = annealing(task, outputs, gold, rows, progress)
    return loss, gold, logged


def test_classification_at_lambda_0_and_1_is_the_teacher_and_the_gold_loss():
    torch.manual_seed(0)
    teacher = torch.randn(6, 5).softmax(-1)  # the teacher's probabilities, 6 examples
    outputs, labels = torch.randn(3, 5), torch.tensor([0.0, 4.0, 2.0])
    rows = torch.tensor([5, 0, 2])
    annealing = TeacherAnnealing(TASKS, {"sst": teacher}, temperature=2.0)
    # T^2 * cross entropy of softened teacher probabilities against the student at T = 2
    softened = (teacher[rows].log() / 2).softmax(-1)
    expected_teacher = 4 * -(softened * F.log_softmax(outputs / 2, -1)).sum(-1).mean()
    loss, gold, logged = losses_at(annealing, "sst", outputs, labels, rows, 0.0)
    torch.testing.assert_close(loss, expected_teacher)
    assert logged["lambda"] == 0.0
    loss, gold, _ = losses_at(annealing, "sst", outputs, labels, rows, 1.0)
    torch.testing.assert_close(loss, F.cross_entropy(outputs, labels.long()))
    torch.testing.assert_close(gold, loss)
    loss, gold, _ = losses_at(annealing, "sst", outputs, labels, rows, 0.25)
    torch.testing.assert_close(loss, 0.25 * gold + 0.75 * expected_teacher)


def test_regression_teacher_loss_uses_the_teacher_scores_as_labels():
    teacher = torch.tensor([1.0, 2.5, 4.0, 0.5])
    outputs, labels, rows = torch.tensor([2.0, 3.0]), torch.tensor([5.0, 0.0]), torch.tensor([3, 1])
    annealing = TeacherAnnealing(TASKS, {"sts": teacher})
    loss, _, _ = losses_at(annealing, "sts", outputs, labels, rows, 0.0)
    torch.testing.assert_close(loss, torch.tensor(((2.0 - 0.5) ** 2 + (3.0 - 2.5) ** 2) / 2))
    loss, _, _ = losses_at(annealing, "sts", outputs, labels, rows, 1.0)
    torch.testing.assert_close(loss, torch.tensor((3.0 ** 2 + 3.0 ** 2) / 2))


def test_binary_teacher_and_tasks_without_teacher():
    teacher = torch.tensor([[0.2, 0.8], [0.9, 0.1]])  # quora: BCE on one logit
    outputs, rows = torch.tensor([0.3, -1.0]), torch.tensor([0, 1])
    annealing = TeacherAnnealing(TASKS, {"quora": teacher})
    loss, _, _ = losses_at(annealing, "quora", outputs, torch.tensor([1.0, 0.0]), rows, 0.0)
    expected = F.binary_cross_entropy_with_logits(outputs, teacher[:, 1])
    torch.testing.assert_close(loss, expected)
    gold = torch.tensor(1.5)
    assert annealing("sts", outputs, gold, rows, 0.0) == (gold, {})
    assert TeacherAnnealing(TASKS, {"sst": teacher}, anneal=False).gold_weight(0.9) == 0.0


def test_mixed_losses_have_the_gradient_of_bams_mixed_target():
    """lambda CE(gold) + (1 - lambda) CE(teacher) == CE(lambda y + (1 - lambda) p_teacher)."""
    torch.manual_seed(1)
    teacher = torch.randn(4, 5).softmax(-1)
    labels, rows = torch.tensor([1.0, 3.0, 0.0, 4.0]), torch.arange(4)
    outputs = torch.randn(4, 5, requires_grad=True)
    annealing = TeacherAnnealing(TASKS, {"sst": teacher})
    loss, _, _ = losses_at(annealing, "sst", outputs, labels, rows, 0.3)
    (ours,) = torch.autograd.grad(loss, outputs)
    target = 0.3 * F.one_hot(labels.long(), 5) + 0.7 * teacher
    (bam,) = torch.autograd.grad(F.cross_entropy(outputs, target), outputs)
    torch.testing.assert_close(ours, bam)


def test_teachers_from_runs_and_prediction_files_agree(tiny_run, tiny_backbone, tiny_data,
                                                       tmp_path):
    config = tiny_config(tiny_backbone, tiny_data, f"distill.teachers={{sst: {tiny_run}}}",
                         tasks="[sst]", max_steps=2)
    trainer = Trainer(config, tmp_path / "student")
    from_run = trainer.distillation.targets["sst"]
    assert from_run.shape == (len(trainer.data["sst"].train), 5)
    torch.testing.assert_close(from_run.sum(-1), torch.ones(len(from_run)))
    split = trainer.data["sst"].train
    for suffix in ("jsonl", "csv", "tsv"):  # every format `mtbert predict` writes
        predictions = tmp_path / f"teacher.{suffix}"
        assert main(["predict", str(tiny_run), "--task", "sst", "--input",
                     str(tiny_data / "ids-sst-train.csv"), "--probabilities", "--output",
                     str(predictions)]) == 0
        from_file = teacher_targets(TASKS["sst"], str(predictions), split, trainer.tokenizer,
                                    64)
        torch.testing.assert_close(from_file, from_run, atol=1e-5, rtol=1e-5, msg=suffix)
    trainer.fit()
    first = trainer.state.first_losses[0]
    assert "sst/teacher_loss" in first


def test_distill_command_trains_a_student_from_teacher_runs(tiny_run, tiny_backbone, tiny_data,
                                                            tmp_path, capsys):
    student = tmp_path / "student"
    code = main(["distill", "--teachers", str(tiny_run), "--run-dir", str(student),
                 "--data-dir", str(tiny_data), "tasks=[sst, sts]",
                 f"model.backbone={tiny_backbone}", "model.max_length=32", "train.max_steps=2",
                 "train.batch_size=16", "train.eval_batch_size=64", "distill.temperature=2",
                 "tasks.sts.head={type: cosine, pooling: mean}"])
    assert code == 0, capsys.readouterr().err
    saved = load_config(student / "config.yaml")
    assert saved.distill.teachers == {"sst": str(tiny_run), "sts": str(tiny_run)}
    lines = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert lines and "sst/lambda" in lines[-1]["train"]


def test_unknown_teacher_task_is_named(tiny_backbone, tiny_data):
    from mtbert.config import ConfigError
    with pytest.raises(ConfigError, match="distill.teachers.nli: no task"):
        tiny_config(tiny_backbone, tiny_data, "distill.teachers={nli: x}")


def test_a_teacher_with_another_vocabulary_of_the_same_size_is_refused(
        tiny_run, tiny_backbone, tiny_data, tmp_path, monkeypatch):
    """Two tokens swapped: same size, other ids, so the teacher would misread every one."""
    import mtbert.model_folder
    from mtbert.config import ConfigError
    from mtbert.tokenizer import Tokenizer, wordpiece_from_vocab

    model, tokenizer, config = mtbert.model_folder.load_model(tiny_run)
    words = (tiny_backbone / "vocab.txt").read_text(encoding="utf-8").split()
    words[5], words[6] = words[6], words[5]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    swapped = Tokenizer(wordpiece_from_vocab(tmp_path / "vocab.txt"))
    assert swapped.vocab_size == tokenizer.vocab_size
    monkeypatch.setattr(mtbert.model_folder, "load_model", lambda path: (model, swapped, config))
    config = tiny_config(tiny_backbone, tiny_data, f"distill.teachers={{sst: {tiny_run}}}",
                         tasks="[sst]", max_steps=1)
    with pytest.raises(ConfigError, match=f"distill.teachers.sst: {tiny_run} has another "
                                          f"vocabulary .*id 5 is {words[5]!r} there, "
                                          f"{words[6]!r} here"):
        Trainer(config, tmp_path / "student")

