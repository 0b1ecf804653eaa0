"""Losses: values against closed forms and brute-force loops, threshold rules, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtbert.losses import (
    LOSSES,
    BinaryCrossEntropyLoss,
    CosineThresholdPositives,
    CrossEntropyLoss,
    HuberLoss,
    LabelThresholdPositives,
    MSELoss,
    MultipleNegativesRankingLoss,
    build_loss,
    select_positive_pairs,
    selected_pairs_mnrl,
)


def test_cross_entropy_matches_log_softmax_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    expected = (
        -(
            (2.0 - math.log(math.exp(2.0) + 1 + math.exp(-1.0)))
            + (0.5 - math.log(2 * math.exp(0.5) + math.exp(3.0)))
        )
        / 2
    )
    assert CrossEntropyLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", [(3,), (3, 1)])
def test_bce_matches_sigmoid_formula_for_both_logit_shapes(shape):
    logits = torch.tensor([1.0, -2.0, 0.5]).reshape(shape)
    labels = torch.tensor([1.0, 0.0, 0.0])
    sig = torch.sigmoid(torch.tensor([1.0, -2.0, 0.5]))
    expected = -(torch.log(sig[0]) + torch.log(1 - sig[1]) + torch.log(1 - sig[2])) / 3
    assert BinaryCrossEntropyLoss()(logits, labels).item() == pytest.approx(expected.item())


def test_regression_losses_reject_broadcasting_shapes():
    with pytest.raises(ValueError, match="shape"):
        MSELoss()(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        HuberLoss()(torch.zeros(4), torch.zeros(4, 1))


def test_mse_and_huber_closed_forms():
    predictions = torch.tensor([[1.0], [3.0], [0.0]])  # (B, 1) accepted
    labels = torch.tensor([1.5, 0.0, 0.2])
    errors = [-0.5, 3.0, -0.2]
    assert MSELoss()(predictions, labels).item() == pytest.approx(sum(e * e for e in errors) / 3)
    delta = 1.0
    huber = [0.5 * e * e if abs(e) <= delta else delta * (abs(e) - 0.5 * delta) for e in errors]
    assert HuberLoss(delta)(predictions, labels).item() == pytest.approx(sum(huber) / 3)


def _mnrl_loop(anchors, positives, scale):
    """Brute force: mean over i of -log softmax_j(scale * cos(a_i, p_j))[i]."""
    total = 0.0
    n = anchors.shape[0]
    for i in range(n):
        scores = [scale * F.cosine_similarity(anchors[i], positives[j], dim=0) for j in range(n)]
        log_denominator = torch.logsumexp(torch.stack(scores), dim=0)
        total = total + (log_denominator - scores[i])
    return total / n


def test_mnrl_equals_cross_entropy_over_scaled_cosine_matrix():
    torch.manual_seed(0)
    anchors, positives = torch.randn(5, 8), torch.randn(5, 8)
    cos = F.cosine_similarity(anchors[:, None, :], positives[None, :, :], dim=-1)  # (5, 5)
    expected = F.cross_entropy(7.0 * cos, torch.arange(5))
    actual = MultipleNegativesRankingLoss(scale=7.0)(anchors, positives)
    torch.testing.assert_close(actual, expected)


def test_mnrl_value_and_gradients_equal_brute_force_loop():
    torch.manual_seed(1)
    a1 = torch.randn(4, 6, requires_grad=True)
    p1 = torch.randn(4, 6, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_()
    p2 = p1.detach().clone().requires_grad_()
    loss = MultipleNegativesRankingLoss()(a1, p1)
    reference = _mnrl_loop(a2, p2, scale=20.0)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


def test_mnrl_extra_negatives_are_extra_columns():
    torch.manual_seed(2)
    anchors, positives, negatives = torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4)
    candidates = torch.cat([positives, negatives])
    cos = F.cosine_similarity(anchors[:, None, :], candidates[None, :, :], dim=-1)  # (3, 5)
    expected = F.cross_entropy(20.0 * cos, torch.arange(3))
    actual = MultipleNegativesRankingLoss()(anchors, positives, negatives=negatives)
    torch.testing.assert_close(actual, expected)


def test_thresholds_anneal_exactly_as_stated():
    label_rule, cosine_rule = LabelThresholdPositives(), CosineThresholdPositives()
    assert [label_rule.threshold(e) for e in range(5)] == [4.4, 4.45, 4.5, 4.55, 4.6]
    assert [cosine_rule.threshold(e) for e in range(5)] == [0.8, 0.82, 0.84, 0.86, 0.88]
    with pytest.raises(ValueError):
        label_rule.threshold(-1)


def test_label_rule_selects_labels_at_or_above_threshold():
    u, v = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([4.4, 4.39, 5.0, 4.6, 4.45])
    rule = LabelThresholdPositives()
    assert select_positive_pairs(rule, u, v, labels, 0).tolist() == [1, 0, 1, 1, 1]
    assert select_positive_pairs(rule, u, v, labels, 1).tolist() == [0, 0, 1, 1, 1]
    assert select_positive_pairs(rule, u, v, labels, 4).tolist() == [0, 0, 1, 1, 0]


def test_cosine_rule_selects_by_pair_cosine_and_ignores_labels():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    # cosines with u: 1.0, 0.81, 0.801 (just above 0.8), 0.0
    v = torch.tensor(
        [[2.0, 0.0], [0.81, math.sqrt(1 - 0.81**2)], [0.801, math.sqrt(1 - 0.801**2)], [0, 1]]
    )
    labels = torch.tensor([0.0, 0.0, 0.0, 5.0])
    rule = CosineThresholdPositives()
    assert select_positive_pairs(rule, u, v, labels, 0).tolist() == [1, 1, 1, 0]
    assert select_positive_pairs(rule, u, v, labels, 1).tolist() == [1, 0, 0, 0]
    assert not rule.similarity(u, v, labels).requires_grad  # detached


def test_selected_pairs_mnrl_uses_unselected_sentences_as_negatives():
    torch.manual_seed(3)
    u, v = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([True, False, True, False])
    loss = MultipleNegativesRankingLoss()
    cos = F.cosine_similarity(u[mask][:, None, :], v[[0, 2, 1, 3]][None, :, :], dim=-1)  # (2, 4)
    expected = F.cross_entropy(20.0 * cos, torch.arange(2))
    torch.testing.assert_close(selected_pairs_mnrl(loss, u, v, mask), expected)


def test_no_selected_pair_gives_zero_that_backpropagates():
    u = torch.randn(3, 4, requires_grad=True)
    v = torch.randn(3, 4, requires_grad=True)
    out = selected_pairs_mnrl(MultipleNegativesRankingLoss(), u, v, torch.zeros(3, dtype=bool))
    assert out.item() == 0.0
    assert out.grad_fn is not None
    out.backward()
    assert torch.equal(u.grad, torch.zeros_like(u))


def test_single_selected_pair_still_contrasts_against_the_batch():
    torch.manual_seed(4)
    u = torch.randn(3, 4, requires_grad=True)
    v = torch.randn(3, 4)
    mask = torch.tensor([False, True, False])
    out = selected_pairs_mnrl(MultipleNegativesRankingLoss(), u, v, mask)
    cos = F.cosine_similarity(u[1], v[[1, 0, 2]], dim=-1)  # (3,)
    torch.testing.assert_close(out, -torch.log_softmax(20.0 * cos, dim=0)[0])
    out.backward()
    assert u.grad[1].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registry_name_builds(name):
    assert isinstance(build_loss(name), LOSSES[name])


def test_build_loss_errors_name_the_known_losses_and_bad_options():
    with pytest.raises(ValueError, match="cross_entropy"):
        build_loss("focal")
    with pytest.raises(ValueError, match="huber"):
        build_loss("huber", delat=2.0)
    assert build_loss("huber", delta=2.0).delta == 2.0
