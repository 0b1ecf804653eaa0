"""Auxiliary terms (MNRL, mixture-of-experts balance and z-losses, registered regularisers)
join the final loss after distillation and the weighting, which see the tasks' own losses
only; PCGrad adds their gradient unprojected (issue 36, defect 1)."""

import json

import pytest
import torch
import torch.nn.functional as F

import mtbert
from mtbert.auxiliary import AuxiliaryLoss, AuxiliaryTerm
from mtbert.balancing.pcgrad import PCGrad, project_conflicting
from mtbert.losses.task import TaskLoss
from mtbert.model.heads import HeadOutput
from mtbert.training import Trainer

from conftest import SIAMESE_HEADS, tiny_config

AUXILIARY = {  # the override that switches each term on; all are off in the baseline
    "mnrl": "tasks.quora.mnrl.weight=1.0",
    "moe_balance": "model.moe.balance_weight=0.5",
    "moe_z": "model.moe.z_weight=0.5",
}


def quora_run(backbone, data, *overrides):
    """Quora alone, siamese, with MNRL on its duplicates and token-routed experts, every
    auxiliary term weighted 0 unless `overrides` say otherwise."""
    return tiny_config(
        backbone, data, SIAMESE_HEADS[0],
        "tasks.quora.mnrl={rule: label, start: 0.5, step_per_epoch: 0.0, weight: 0.0}",
        "model.moe={experts: 2, every: 1, capacity_factor: null, noisy_gating: false, "
        "balance_weight: 0.0, z_weight: 0.0}",
        *overrides, tasks="[quora]", max_steps=1)


def encoder_after_one_step(config, run_dir):
    trainer = Trainer(config, run_dir)
    logged = trainer.train_step()
    return trainer.model.encoder.state_dict(), logged


def changes_the_encoder(config, baseline, run_dir):
    state, logged = encoder_after_one_step(config, run_dir)
    return any(not torch.equal(state[k], baseline[k]) for k in state), logged


@pytest.fixture
def teacher_file(tmp_path, tiny_data):
    """A teacher for every Quora training example, as `mtbert predict` writes it."""
    path = tmp_path / "teacher.jsonl"
    lines = (tiny_data / "quora-train.csv").read_text(encoding="utf-8").splitlines()[1:]
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            example_id = line.split("\t")[1]
            f.write(json.dumps({"id": example_id, "probabilities": {
                "not duplicate": 0.3, "duplicate": 0.7}}) + "\n")
    return path


@pytest.mark.parametrize("term", AUXILIARY)
def test_auxiliary_terms_train_when_distillation_keeps_no_gold_loss(
        term, tmp_path, tiny_backbone, tiny_data, teacher_file):
    """distill.anneal: false trains on the teacher's loss alone (lambda = 0); the auxiliary
    terms must still reach the encoder (before, they were inside the gold loss and got
    lambda's zero)."""
    distill = [f"distill.teachers={{quora: {teacher_file}}}", "distill.anneal=false"]
    baseline, _ = encoder_after_one_step(quora_run(tiny_backbone, tiny_data, *distill),
                                         tmp_path / "baseline")
    changed, logged = changes_the_encoder(
        quora_run(tiny_backbone, tiny_data, *distill, AUXILIARY[term]), baseline,
        tmp_path / term)
    assert logged["quora/lambda"] == 0.0 and logged[f"quora/{term}"] > 0
    assert changed


@pytest.mark.parametrize("term", AUXILIARY)
def test_loss_weightings_do_not_rescale_auxiliary_terms(term, tmp_path, tiny_backbone,
                                                        tiny_data):
    """A task weighted 0 trains nothing by its loss; its auxiliary terms still train."""
    weighted = ["train.weighting=static", "tasks.quora.weight=0.0"]
    baseline, _ = encoder_after_one_step(quora_run(tiny_backbone, tiny_data, *weighted),
                                         tmp_path / "baseline")
    changed, _ = changes_the_encoder(
        quora_run(tiny_backbone, tiny_data, *weighted, AUXILIARY[term]), baseline,
        tmp_path / term)
    assert changed


def test_pcgrad_adds_the_auxiliary_gradient_unprojected():
    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    head = torch.nn.Parameter(torch.tensor(3.0))
    terms = {"a": (shared * torch.tensor([1.0, 0.0])).sum() * head,
             "b": (shared * torch.tensor([-1.0, 1.0])).sum()}  # conflicts with a
    auxiliary = (shared * torch.tensor([5.0, -7.0])).sum() * head
    PCGrad(seed=0).backward(terms, [shared], [head], auxiliary=auxiliary)
    grads = torch.tensor([[3.0, 0.0], [-1.0, 1.0]])
    projected = project_conflicting(grads, [[1], [0]]).sum(0)
    torch.testing.assert_close(shared.grad, projected + torch.tensor([15.0, -21.0]))
    torch.testing.assert_close(head.grad, torch.tensor(1.0 + (5.0 - 14.0)))


class HalfEmbeddingNorm(AuxiliaryLoss):
    """A regulariser of one file: half the mean squared norm of the first embeddings."""

    @classmethod
    def from_task(cls, task):
        return cls() if task.name == "quora" else None

    weight = 0.25

    def forward(self, output, labels, epoch):
        return 0.5 * output.embeddings[0].square().sum(-1).mean()


def test_a_registered_regulariser_is_an_auxiliary_term_of_its_tasks(tiny_backbone, tiny_data):
    mtbert.register("auxiliary_loss", "half_norm", HalfEmbeddingNorm)
    try:
        config = tiny_config(tiny_backbone, tiny_data, *SIAMESE_HEADS)
        quora, sts = (TaskLoss(config.task(name)) for name in ("quora", "sts"))
    finally:
        mtbert.registry.registry("auxiliary_loss").unregister("half_norm")
    u = torch.randn(4, 8, requires_grad=True)
    output = HeadOutput(torch.randn(4), (u, torch.randn(4, 8)))
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss, auxiliary, logged = quora(output, labels, epoch=0)
    term = auxiliary["half_norm"]
    assert isinstance(term, AuxiliaryTerm) and term.weight == 0.25
    torch.testing.assert_close(term.value, 0.5 * u.square().sum(-1).mean())
    assert logged["half_norm"] == pytest.approx(term.value.item())
    torch.testing.assert_close(  # the task's loss alone, without the term
        loss, F.binary_cross_entropy_with_logits(output.predictions, labels))
    assert "half_norm" not in sts(output, labels, epoch=0)[1]
