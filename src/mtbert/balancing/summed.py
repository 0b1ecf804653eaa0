"""Plain summed gradients: the ordinary multi-task backward pass."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtbert.balancing.base import GradientCombiner, trainable


class SumGradients(GradientCombiner):
    """Backpropagates ``sum(terms.values())`` (plus the auxiliary terms) into the given
    parameters.

    Equivalent to ``total.backward()`` restricted to ``shared_params + other_params`` (other
    leaves get nothing); gradients are added to existing ``.grad``.

    References:
        - Caruana 1997, Multitask Learning, Machine Learning 28: the summed multi-task objective.
    """

    def backward(
        self,
        terms: dict[str, Tensor],
        shared_params: Sequence[nn.Parameter],
        other_params: Sequence[nn.Parameter],
        auxiliary: Tensor | None = None,
    ) -> None:
        if not terms:
            raise ValueError("SumGradients needs at least one term.")
        params = trainable([*shared_params, *other_params])
        if not params:
            raise ValueError("SumGradients got no trainable parameters.")
        total = torch.stack(list(terms.values())).sum()  # ()
        if auxiliary is not None:
            total = total + auxiliary
        torch.autograd.backward(total, inputs=params)
