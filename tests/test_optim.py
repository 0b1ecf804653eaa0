"""Our AdamW against torch.optim.AdamW."""

import pytest
import torch

from mtbert.optim import AdamW, warmup_linear_decay


def make_problem(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.randn(s, generator=g) for s in shapes], g


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_adamw_after_100_steps(weight_decay, seed):
    init, g = make_problem(seed)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kwargs = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    opt_ours, opt_theirs = AdamW(ours, **kwargs), torch.optim.AdamW(theirs, **kwargs)
    targets = [torch.randn(p.shape, generator=g) for p in init]
    for _ in range(100):
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss = sum(((p - t) ** 2 * (1 + p.abs())).sum() for p, t in zip(params, targets))
            loss.backward()
            opt.step()
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() <= 1e-6
    assert any((a - i).abs().max() > 0.1 for a, i in zip(ours, init)), "parameters must move"


def test_rows_without_gradient_match_torch_adamw():
    """Like word embeddings: rows never looked up keep a zero second moment (sqrt(0) path)."""
    torch.manual_seed(0)
    init = torch.randn(50, 8)
    ours, theirs = init.clone().requires_grad_(), init.clone().requires_grad_()
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    opt_ours, opt_theirs = AdamW([ours], **kwargs), torch.optim.AdamW([theirs], **kwargs)
    for step in range(30):
        rows = torch.arange(step % 5, 20, 5)  # rows 0-19 now and then, 20-49 never
        for param, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            (param[rows] ** 2).sum().backward()
            opt.step()
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert opt_ours.state[ours]["exp_avg_sq"][20:].eq(0).all()


def test_parameters_without_grad_are_untouched_and_keep_their_step():
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = AdamW([used, unused], lr=0.1, weight_decay=0.1)
    used.sum().backward()
    opt.step()
    assert torch.equal(unused, torch.ones(3))
    assert opt.state[used]["step"] == 1 and unused not in opt.state
    unused.sum().backward()  # now both have gradients, with different step counts
    opt.step()
    assert opt.state[used]["step"] == 2 and opt.state[unused]["step"] == 1


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.zeros(1, requires_grad=True)], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW([torch.zeros(1, requires_grad=True)], lr=-1)


def test_warmup_then_linear_decay():
    p = torch.zeros(1, requires_grad=True)
    opt = AdamW([p], lr=1.0)
    schedule = warmup_linear_decay(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
