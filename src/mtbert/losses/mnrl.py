"""Multiple negatives ranking loss and the threshold rules that pick its positive pairs."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbert.auxiliary import AuxiliaryLoss
from mtbert.distributed import current_world, gather_rows
from mtbert.registry import Registry


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch softmax ranking loss: each anchor must pick out its own positive.

    For anchors a (N, D) and positives p (N, D) the scores are ``scale * cos(a_i, p_j)`` (N, N)
    and the loss is ``cross_entropy(scores, arange(N))``: every other positive in the batch (and
    every optional extra negative) is a negative for ``a_i``. ``scale`` is the inverse softmax
    temperature (20 is temperature 0.05). Duplicates in a batch become false negatives: if
    ``p_j`` (j != i) says the same as ``p_i``, the loss still pushes ``a_i`` away from it.

    Args:
        scale: Multiplier of the cosine similarities, 1 / temperature (> 0).

    References:
        - Henderson et al. 2017, Efficient Natural Language Response Suggestion for Smart Reply,
          https://arxiv.org/abs/1705.00652
        - OptimusBERT report (shared/papers/optimusbert.txt): MNRL on similar STS sentence pairs.

    Inputs:
        - anchors: embeddings (N, D)
        - positives: embeddings (N, D); row i is the positive of anchor i
        - negatives: optional embeddings (M, D), extra negatives for every anchor

    Returns:
        Scalar mean loss.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"MultipleNegativesRankingLoss needs scale > 0, got {scale}.")
        self.scale = scale

    def forward(
        self, anchors: Tensor, positives: Tensor, negatives: Tensor | None = None
    ) -> Tensor:
        if anchors.dim() != 2 or anchors.shape != positives.shape:
            raise ValueError(
                "Expected anchors and positives of the same shape (N, D), "
                f"got {tuple(anchors.shape)} and {tuple(positives.shape)}."
            )
        if negatives is not None and (
            negatives.dim() != 2 or negatives.shape[1] != anchors.shape[1]
        ):
            raise ValueError(
                f"Expected negatives of shape (M, {anchors.shape[1]}), "
                f"got {tuple(negatives.shape)}."
            )
        candidates = positives if negatives is None else torch.cat([positives, negatives])
        # (N, D) @ (D, N + M) -> (N, N + M)
        scores = self.scale * F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
        targets = torch.arange(anchors.shape[0], device=anchors.device)  # (N,)
        return F.cross_entropy(scores, targets)


class ThresholdPositives:
    """A pair (u_i, v_i) is positive when its similarity >= ``threshold(epoch)``.

    The threshold anneals upward, ``start + step * epoch`` (epoch counted from 0), so what counts
    as similar gets stricter as training goes on (OptimusBERT report). Subclasses say which
    similarity is compared.

    Args:
        start: Threshold at epoch 0.
        step: Increase per epoch.

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt): annealed-threshold MNRL positives.
    """

    def __init__(self, start: float, step: float):
        self.start = start
        self.step = step

    def threshold(self, epoch: int) -> float:
        """``start + step * epoch``, rounded to 10 decimals so 4.4 + 4 * 0.05 is exactly 4.6."""
        if epoch < 0:
            raise ValueError(f"The epoch must be >= 0, got {epoch}.")
        return round(self.start + self.step * epoch, 10)

    def similarity(self, u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        """Similarity of each pair (N,), compared against the threshold."""
        raise NotImplementedError


class LabelThresholdPositives(ThresholdPositives):
    """Positive when the gold similarity label >= ``start + step * epoch`` (STS scale 0-5).

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt): label threshold 4.4, +0.05 per epoch.
    """

    def __init__(self, start: float = 4.4, step: float = 0.05):
        super().__init__(start, step)

    def similarity(self, u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        return labels  # (N,)


class CosineThresholdPositives(ThresholdPositives):
    """Positive when ``cos(u_i, v_i)`` (detached) >= ``start + step * epoch``.

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt): cosine threshold 0.8, +0.02 per epoch.
    """

    def __init__(self, start: float = 0.8, step: float = 0.02):
        super().__init__(start, step)

    def similarity(self, u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        return F.cosine_similarity(u.detach(), v.detach(), dim=-1)  # (N,)


POSITIVE_RULES = Registry("positive_rule", {
    "label": LabelThresholdPositives,
    "cosine": CosineThresholdPositives,
})


def select_positive_pairs(
    rule: ThresholdPositives, u: Tensor, v: Tensor, labels: Tensor, epoch: int
) -> Tensor:
    """Boolean mask (N,) of the pairs (u_i, v_i) that ``rule`` counts as positive at ``epoch``.

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt).

    Inputs:
        - u, v: embeddings (N, D) of the two sentences of each pair
        - labels: gold similarity (N,)
    """
    if u.dim() != 2 or u.shape != v.shape or labels.shape != u.shape[:1]:
        raise ValueError(
            "Expected u and v of shape (N, D) and labels of shape (N,), got "
            f"{tuple(u.shape)}, {tuple(v.shape)} and {tuple(labels.shape)}."
        )
    return rule.similarity(u, v, labels) >= rule.threshold(epoch)  # (N,) bool


def selected_pairs_mnrl(
    loss: MultipleNegativesRankingLoss, u: Tensor, v: Tensor, mask: Tensor
) -> Tensor:
    """Auxiliary MNRL on a pair task's batch: the selected pairs are (anchor, positive).

    Every second sentence of the batch is a candidate: the selected ``v`` are each other's
    negatives and the unselected ``v`` are extra negatives for every selected anchor. Under
    DDP the batch is the global one: every rank's ``v`` are gathered with autograd
    (``gather_rows``), so each anchor ranks its positive against the whole global batch, as
    in sentence-transformers' distributed MNRL. A rank returns the sum of its anchors'
    losses over the global number of anchors, times the world size, so the mean over ranks
    that DDP takes of the gradients is the gradient of the global mean. With no pair
    selected anywhere it returns a zero that backpropagates like a real loss.

    References:
        - Henderson et al. 2017, https://arxiv.org/abs/1705.00652
        - OptimusBERT report (shared/papers/optimusbert.txt): other sentences of the batch are
          the negatives.

    Inputs:
        - u, v: embeddings (N, D) of this rank's pairs
        - mask: bool (N,), e.g. from ``select_positive_pairs``
    """
    all_v, start = gather_rows(v)  # (N_all, D), this rank's rows from `start`
    all_mask = gather_rows(mask.to(torch.uint8))[0].bool()  # (N_all,)
    anchors = int(all_mask.sum())
    keep_graph = all_v.sum() * 0  # every rank's backward must reach the gather
    if anchors == 0:
        return u.sum() * 0 + keep_graph
    candidates = torch.cat([all_v[all_mask], all_v[~all_mask]])  # (N_all, D), positives first
    # (K, D) @ (D, N_all) -> (K, N_all)
    scores = loss.scale * F.normalize(u[mask], dim=-1) @ F.normalize(candidates, dim=-1).T
    first = int(all_mask[:start].sum())  # this rank's first anchor among all positives
    targets = torch.arange(first, first + scores.shape[0], device=u.device)  # (K,)
    share = current_world().size / anchors
    return F.cross_entropy(scores, targets, reduction="sum") * share + keep_graph


class AuxiliaryMnrl(AuxiliaryLoss):
    """MNRL as a pair task's auxiliary term (its config's `mnrl:`): the pairs its positive
    rule selects at the epoch are anchors and positives (`selected_pairs_mnrl`), on the
    siamese head's two sentence embeddings.

    References:
        - OptimusBERT report (shared/papers/optimusbert.txt): MNRL beside the STS loss.
    """

    @classmethod
    def from_task(cls, task) -> "AuxiliaryMnrl | None":
        return None if task.mnrl is None else cls(task.mnrl)

    def __init__(self, config):
        super().__init__()
        self.loss = MultipleNegativesRankingLoss(scale=config.scale)
        self.rule = POSITIVE_RULES[config.rule](config.start, config.step_per_epoch)
        self.weight = config.weight

    def forward(self, output, labels: Tensor, epoch: int) -> Tensor:
        u, v = (e.float() for e in output.embeddings)  # fp32 under bf16 autocast
        mask = select_positive_pairs(self.rule, u, v, labels, epoch)
        return selected_pairs_mnrl(self.loss, u, v, mask)
