"""Loss weightings and gradient combiners against hand-computed closed forms."""

import math

import pytest
import torch
from torch import nn

from mtbert.balancing import (
    COMBINERS,
    WEIGHTINGS,
    DynamicWeightAverage,
    GradNormWeighting,
    PCGrad,
    StaticWeighting,
    SumGradients,
    SumWeighting,
    TaskContext,
    UncertaintyWeighting,
    accumulate_flat_grad,
    build_combiner,
    build_weighting,
    per_task_gradients,
    project_conflicting,
)

# ---------------------------------------------------------------- PCGrad projection


def test_pcgrad_two_conflicting_gradients_match_hand_computation():
    g1, g2 = [1.0, 0.0], [-1.0, 1.0]  # g1 . g2 = -1 < 0
    # g1' = g1 - (-1 / ||g2||^2) g2 = (1, 0) + 0.5 * (-1, 1) = (0.5, 0.5)
    # g2' = g2 - (-1 / ||g1||^2) g1 = (-1, 1) + (1, 0) = (0, 1)
    projected = project_conflicting(torch.tensor([g1, g2]), [[1], [0]])
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(projected.sum(0), torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize(
    "g1, g2", [([1.0, 0.0], [0.0, 1.0]), ([1.0, 1.0], [1.0, 0.0]), ([0.0, 0.0], [-1.0, 2.0])]
)
def test_pcgrad_leaves_non_conflicting_gradients_alone(g1, g2):
    grads = torch.tensor([g1, g2])
    torch.testing.assert_close(project_conflicting(grads, [[1], [0]]), grads)


def _pcgrad_reference(grads, orders):
    """Algorithm 1 of Yu et al. 2020 in plain Python floats."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    out = []
    for i, order in enumerate(orders):
        g = list(grads[i])
        for j in order:
            d = dot(g, grads[j])
            if d < 0:
                g = [x - d / dot(grads[j], grads[j]) * y for x, y in zip(g, grads[j], strict=True)]
        out.append(g)
    return out


def test_pcgrad_three_tasks_match_brute_force_for_fixed_orders():
    grads = [[1.0, 2.0, -1.0, 0.5], [-2.0, 0.5, 1.0, 0.0], [0.5, -3.0, 0.2, 1.0]]
    orders_a = [[1, 2], [2, 0], [0, 1]]
    orders_b = [[2, 1], [0, 2], [1, 0]]
    for orders in (orders_a, orders_b):
        expected = torch.tensor(_pcgrad_reference(grads, orders), dtype=torch.float64)
        actual = project_conflicting(torch.tensor(grads, dtype=torch.float64), orders)
        torch.testing.assert_close(actual, expected)
    # the order matters here, so the test would notice an ignored order
    assert not torch.allclose(
        project_conflicting(torch.tensor(grads), orders_a),
        project_conflicting(torch.tensor(grads), orders_b),
    )


# ---------------------------------------------------------------- PCGrad end to end


def _tiny_model():
    torch.manual_seed(0)
    shared = nn.Linear(3, 4)
    head1 = nn.Linear(4, 1)
    head2 = nn.Linear(4, 1)
    with torch.no_grad():  # head2 close to head1 so that -mean(head2) conflicts with mean(head1)
        head2.weight.copy_(head1.weight + 0.1 * torch.randn_like(head1.weight))
        head2.bias.copy_(head1.bias)
    return shared, head1, head2


def _terms(shared, head1, head2, x):
    z = torch.tanh(shared(x))  # (B, 4)
    return {"a": head1(z).mean(), "b": -head2(z).mean() + (z**2).mean()}


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_pcgrad_end_to_end_shared_grads_projected_heads_plain():
    shared, head1, head2 = _tiny_model()
    x = torch.randn(8, 3)
    shared_params = list(shared.parameters())
    head_params = [*head1.parameters(), *head2.parameters()]

    terms = _terms(shared, head1, head2, x)
    g1 = _flat(torch.autograd.grad(terms["a"], shared_params, retain_graph=True))
    g2 = _flat(torch.autograd.grad(terms["b"], shared_params, retain_graph=True))
    dot = g1 @ g2
    assert dot < 0, "the toy must have conflicting gradients"
    expected_shared = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    expected_heads = _flat(torch.autograd.grad(terms["a"] + terms["b"], head_params))

    PCGrad(seed=0).backward(_terms(shared, head1, head2, x), shared_params, head_params)
    torch.testing.assert_close(_flat([p.grad for p in shared_params]), expected_shared)
    torch.testing.assert_close(_flat([p.grad for p in head_params]), expected_heads)
    assert not torch.allclose(expected_shared, g1 + g2)


def test_pcgrad_accumulates_over_calls():
    shared, head1, head2 = _tiny_model()
    params = [*shared.parameters(), *head1.parameters(), *head2.parameters()]
    batches = [torch.randn(8, 3), torch.randn(8, 3)]
    expected = torch.zeros(sum(p.numel() for p in params))
    for x in batches:  # each call alone, from zero grads
        for p in params:
            p.grad = None
        PCGrad(seed=0).backward(_terms(shared, head1, head2, x), params[:2], params[2:])
        expected += _flat([p.grad for p in params])
    for p in params:
        p.grad = None
    combiner = PCGrad(seed=0)
    for x in batches:
        combiner.backward(_terms(shared, head1, head2, x), params[:2], params[2:])
    torch.testing.assert_close(_flat([p.grad for p in params]), expected)
    assert combiner.state_dict() == {"calls": 2}


def test_pcgrad_orders_reproducible_from_seed_and_counter():
    a, b = PCGrad(seed=5), PCGrad(seed=5)
    assert a.orders(4) == b.orders(4)
    for i, order in enumerate(a.orders(4)):
        assert sorted(order) == [j for j in range(4) if j != i]
    sequence = []
    for calls in range(10):
        a.calls = calls
        sequence.append(a.orders(4))
    assert len({str(orders) for orders in sequence}) > 1, "orders must change with the counter"
    resumed = PCGrad(seed=5)
    resumed.load_state_dict({"calls": 7})
    assert resumed.orders(4) == sequence[7]
    other = PCGrad(seed=6)
    other_sequence = []
    for calls in range(10):
        other.calls = calls
        other_sequence.append(other.orders(4))
    assert other_sequence != sequence


def test_pcgrad_applies_its_drawn_orders_whatever_the_dict_order():
    grads = {"a": [1.0, 2.0, -1.0, 0.5], "b": [-2.0, 0.5, 1.0, 0.0], "c": [0.5, -3.0, 0.2, 1.0]}
    p = nn.Parameter(torch.zeros(4))

    def run(names, calls):
        p.grad = None
        combiner = PCGrad(seed=9)
        combiner.load_state_dict({"calls": calls})
        combiner.backward({n: p @ torch.tensor(grads[n]) for n in names}, [p], [])
        return p.grad.clone()

    for calls in range(6):
        combiner = PCGrad(seed=9)
        combiner.load_state_dict({"calls": calls})
        ordered = torch.tensor([grads[n] for n in sorted(grads)])  # rows in sorted-name order
        expected = project_conflicting(ordered, combiner.orders(3)).sum(0)
        torch.testing.assert_close(run(["a", "b", "c"], calls), expected)
        torch.testing.assert_close(run(["c", "a", "b"], calls), expected)


# ---------------------------------------------------------------- helpers and SumGradients


def test_per_task_gradients_zero_for_unreached_params_and_accumulate_adds():
    p1 = nn.Parameter(torch.tensor([1.0, 2.0]))
    p2 = nn.Parameter(torch.tensor([3.0]))
    terms = {"a": (p1**2).sum(), "b": 5 * p2.sum()}
    grads = per_task_gradients(terms, [p1, p2])
    torch.testing.assert_close(grads, torch.tensor([[2.0, 4.0, 0.0], [0.0, 0.0, 5.0]]))
    p1.grad = torch.ones(2)
    accumulate_flat_grad(torch.tensor([1.0, 2.0, 3.0]), [p1, p2])
    torch.testing.assert_close(p1.grad, torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(p2.grad, torch.tensor([3.0]))


def test_sum_gradients_accumulates_and_touches_only_given_params():
    p = nn.Parameter(torch.tensor([1.0, -1.0]))
    outside = nn.Parameter(torch.tensor(2.0))
    combiner = SumGradients()
    for _ in range(2):
        terms = {"a": (p**2).sum() * outside, "b": p.sum()}
        combiner.backward(terms, [p], [])
    torch.testing.assert_close(p.grad, 2 * (2 * 2.0 * p.detach() + 1))
    assert outside.grad is None


# ---------------------------------------------------------------- weightings


def test_sum_and_static_weightings():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    assert SumWeighting(["a", "b"])(losses, []) == losses
    static = StaticWeighting(["a", "b"], {"a": 0.5, "b": 2.0})
    assert static({"b": losses["b"]}, []) == {"b": torch.tensor(6.0)}  # subset of tasks
    assert static.weights() == {"a": 0.5, "b": 2.0}
    with pytest.raises(ValueError, match="exactly the tasks"):
        StaticWeighting(["a", "b"], {"a": 1.0})
    with pytest.raises(ValueError, match="subset"):
        static({"c": losses["a"]}, [])


def test_uncertainty_at_init_is_plain_sum_up_to_the_regression_half():
    weighting = UncertaintyWeighting(["cls", "reg"], {"cls": "classification", "reg": "regression"})
    losses = {"cls": torch.tensor(1.3), "reg": torch.tensor(0.7)}
    terms = weighting(losses, [])
    assert sum(terms.values()).item() == pytest.approx(1.3 + 0.5 * 0.7)
    assert weighting.weights() == {"cls": 1.0, "reg": 0.5}


@pytest.mark.parametrize("kind, factor", [("classification", 1.0), ("regression", 0.5)])
def test_uncertainty_gradient_wrt_log_var_is_analytic(kind, factor):
    weighting = UncertaintyWeighting(["t"], {"t": kind})
    s, loss_value = 0.3, 2.0
    with torch.no_grad():
        weighting.log_vars.fill_(s)
    loss = torch.tensor(loss_value, requires_grad=True)
    weighting({"t": loss}, [])["t"].backward()
    expected = -factor * math.exp(-s) * loss_value + 0.5  # d/ds (c e^-s L + s/2)
    assert weighting.log_vars.grad.item() == pytest.approx(expected)
    assert loss.grad.item() == pytest.approx(factor * math.exp(-s))


def test_uncertainty_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="classification"):
        UncertaintyWeighting(["t"], {"t": "ranking"})
    with pytest.raises(ValueError, match="task kind"):
        UncertaintyWeighting(["t", "u"], {"t": "regression"})


def _gradnorm_setup():
    """Shared layer W (2x2) and two tasks whose W-gradient norms differ by a factor > 5."""
    torch.manual_seed(0)
    shared = nn.Linear(2, 2, bias=False)
    x = torch.randn(4, 2)

    def losses(scale_big=1.0, scale_small=1.0):
        z = shared(x)  # (4, 2)
        return {
            "big": scale_big * 100.0 * (z[:, 0] ** 2).mean() + 1.0,
            "small": scale_small * (z[:, 1] ** 2).mean() + 1.0,
        }

    return shared, losses


def _norms(losses, params):
    return [
        _flat(torch.autograd.grad(loss, params, retain_graph=True)).norm().item()
        for loss in losses.values()
    ]


def test_gradnorm_first_step_lowers_the_weight_of_the_larger_gradient():
    shared, losses = _gradnorm_setup()
    weighting = GradNormWeighting(["big", "small"], alpha=1.5)
    first = losses()
    n_big, n_small = _norms(first, list(shared.parameters()))
    assert n_big > 5 * n_small
    terms = weighting(first, list(shared.parameters()))
    # first call: r_i = 1, target = mean(G); G_big > target > G_small
    torch.testing.assert_close(weighting.loss_weights.grad, torch.tensor([n_big, -n_small]))
    torch.testing.assert_close(terms["big"], first["big"].detach())  # w = 1 and detached
    assert terms["big"].grad_fn is not None  # still backpropagates into the model
    torch.optim.SGD(weighting.parameters(), lr=0.01).step()
    weighting.after_optimizer_step()
    w = weighting.weights()
    assert w["big"] < 1.0 < w["small"]
    assert w["big"] + w["small"] == pytest.approx(2.0)


def test_gradnorm_target_uses_relative_inverse_training_rates():
    shared, losses = _gradnorm_setup()
    params = list(shared.parameters())
    weighting = GradNormWeighting(["big", "small"], alpha=1.5)
    first = losses()
    weighting(first, params)
    second = losses(scale_big=0.5)  # "big" trains faster: r_big < 1 < r_small
    norms = torch.tensor(_norms(second, params))
    ratios = torch.stack([second[k] / first[k] for k in ("big", "small")]).detach()
    r = ratios / ratios.mean()
    # pick w so that G_big / mean(G) lies between r_big ** 1.5 and r_big ** 1: the sign of
    # G - target then depends on alpha (and on L(0) being the first call's losses)
    frac = (r[0] ** 1.5 + r[0]) / 2
    w = torch.stack([frac, 2 - frac]) / norms
    w = 2 * w / w.sum()
    with torch.no_grad():
        weighting.loss_weights.copy_(w)
    weighting(second, params)
    torch.testing.assert_close(weighting.loss_weights.grad, torch.stack([norms[0], -norms[1]]))
    torch.testing.assert_close(
        weighting.initial_losses, torch.stack([first["big"], first["small"]]).detach()
    )


def test_gradnorm_renormalises_to_task_count_and_keeps_weights_positive():
    weighting = GradNormWeighting(["a", "b", "c"])
    with torch.no_grad():
        weighting.loss_weights.copy_(torch.tensor([4.0, -1.0, 0.5]))
    weighting.after_optimizer_step()
    w = weighting.loss_weights.detach()
    assert (w > 0).all()
    assert w.sum().item() == pytest.approx(3.0)


def test_gradnorm_needs_every_task():
    shared, losses = _gradnorm_setup()
    with pytest.raises(ValueError, match="every task"):
        GradNormWeighting(["big", "small"])({"big": losses()["big"]}, list(shared.parameters()))


def _step(weighting, losses):
    """One good optimizer step, as the trainer drives a weighting."""
    terms = weighting({name: torch.tensor(value) for name, value in losses.items()}, [])
    weighting.after_optimizer_step()
    return terms


def _feed_epoch(weighting, losses_per_task):
    for name, values in losses_per_task.items():
        for value in values:
            _step(weighting, {name: value})
    weighting.on_epoch_end()


def _dwa_expected(ratios, temperature=2.0):
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


def test_dwa_weights_from_known_loss_sequences():
    dwa = DynamicWeightAverage(["a", "b"], temperature=2.0)
    assert dwa.weights() == {"a": 1.0, "b": 1.0}
    _feed_epoch(dwa, {"a": [2.0, 4.0], "b": [1.0, 1.0]})  # means 3, 1
    assert dwa.weights() == {"a": 1.0, "b": 1.0}  # epoch 2 still uses 1
    _feed_epoch(dwa, {"a": [1.5], "b": [1.0]})  # means 1.5, 1 -> r = (0.5, 1)
    expected = _dwa_expected([0.5, 1.0])
    assert list(dwa.weights().values()) == pytest.approx(expected)
    terms = _step(dwa, {"a": 3.0, "b": 2.0})
    assert terms["a"].item() == pytest.approx(expected[0] * 3.0)
    assert terms["b"].item() == pytest.approx(expected[1] * 2.0)
    _step(dwa, {"a": 0.0})  # epoch 3 means: a = 1.5, b = 2 -> r = (1, 2)
    dwa.on_epoch_end()
    assert list(dwa.weights().values()) == pytest.approx(_dwa_expected([1.0, 2.0]))


def test_dwa_state_dict_round_trip_mid_epoch():
    dwa = DynamicWeightAverage(["a", "b"])
    _feed_epoch(dwa, {"a": [2.0], "b": [1.0]})
    _feed_epoch(dwa, {"a": [1.0], "b": [1.0]})
    _step(dwa, {"a": 0.4, "b": 0.9})  # half-way through epoch 3
    restored = DynamicWeightAverage(["a", "b"])
    restored.load_state_dict(dwa.state_dict())
    assert restored.weights() == dwa.weights()
    for module in (dwa, restored):
        _step(module, {"a": 0.6, "b": 1.1})
        module.on_epoch_end()
    assert restored.weights() == dwa.weights()
    assert list(restored.weights().values()) == pytest.approx(_dwa_expected([0.5, 1.0]))


def test_dwa_refuses_an_epoch_without_some_task():
    dwa = DynamicWeightAverage(["a", "b"])
    _step(dwa, {"a": 1.0})
    with pytest.raises(ValueError, match="no loss"):
        dwa.on_epoch_end()


def test_dwa_forgets_a_skipped_steps_losses():
    """A NaN step's loss used to enter the epoch sums before the step was skipped, so every
    later weight was NaN."""
    dwa = DynamicWeightAverage(["a", "b"])
    dwa({"a": torch.tensor(float("nan")), "b": torch.tensor(5.0)}, [])
    dwa.after_skipped_step()
    for epoch in ({"a": [2.0], "b": [1.0]}, {"a": [1.0], "b": [1.0]}):
        _feed_epoch(dwa, epoch)
    assert list(dwa.weights().values()) == pytest.approx(_dwa_expected([0.5, 1.0]))


# ---------------------------------------------------------------- registries

CONTEXT = TaskContext(("a", "b"), {"a": "classification", "b": "regression"},
                      {"a": 1.0, "b": 0.5}, seed=3)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_name_builds(name):
    weighting = build_weighting(name, CONTEXT)
    assert isinstance(weighting, WEIGHTINGS[name])
    assert set(weighting.weights()) == {"a", "b"}


def test_static_weights_come_from_the_tasks_unless_given():
    """`TaskConfig.weight` used to be read by nothing."""
    assert build_weighting("static", CONTEXT).weights() == {"a": 1.0, "b": 0.5}
    given = build_weighting("static", CONTEXT, weights={"a": 2.0, "b": 3.0})
    assert given.weights() == {"a": 2.0, "b": 3.0}


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_every_combiner_name_builds(name):
    assert isinstance(build_combiner(name, CONTEXT), COMBINERS[name])


def test_registry_errors_name_the_known_entries():
    with pytest.raises(ValueError, match="uncertainty"):
        build_weighting("mgda", CONTEXT)
    with pytest.raises(ValueError, match="pcgrad"):
        build_combiner("cagrad", CONTEXT)
    with pytest.raises(ValueError, match="dwa"):
        build_weighting("dwa", CONTEXT, temprature=2.0)
    with pytest.raises(ValueError, match="Static weights must name exactly the tasks"):
        build_weighting("static", TaskContext(("a",)))  # no weight for task a
