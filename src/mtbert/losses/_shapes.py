"""Shape check shared by the losses that compare one predicted score per example with a label."""

from torch import Tensor


def scores_like_labels(outputs: Tensor, labels: Tensor) -> Tensor:
    """Return ``outputs`` as scores (B,) matching ``labels`` (B,); a trailing size-1 dim is dropped.

    Raises ValueError rather than letting (B, 1) against (B,) broadcast into a (B, B) loss.
    """
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        outputs = outputs.squeeze(1)  # (B, 1) -> (B,)
    if labels.dim() != 1 or outputs.shape != labels.shape:
        raise ValueError(
            "Expected predictions of shape (B,) or (B, 1) and labels of shape (B,), "
            f"got {tuple(outputs.shape)} and {tuple(labels.shape)}."
        )
    return outputs
