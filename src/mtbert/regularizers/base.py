"""What a regulariser declares for the rest of mtbert (see `regularizers/__init__.py`)."""

from __future__ import annotations

from torch import Tensor, nn


class Regularizer:
    """An auxiliary training term, `regularizer(model, task, batch, output) -> Tensor`
    (unweighted). The defaults are those of a stateless term."""

    @staticmethod
    def check(**options) -> None:
        """Raise `ValueError` ("OPTION: why") if the options leave the term unable to act."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called after every good optimizer step."""

    def state_dict(self) -> dict[str, Tensor]:
        """What a resumed run needs to go on exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass
