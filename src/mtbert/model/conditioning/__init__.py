"""Task-aware encoders: modules that change the encoder's computation for the task it serves.

Each variant is an `nn.Module` with `hooks(task) -> EncoderHooks` (see `model/bert.py`) and
lives in a file of its own; `CONDITIONINGS` maps the config name to the class.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtbert.config import ConfigError, ModelConfig
from mtbert.model.bert import BertConfig

CONDITIONINGS: dict[str, type[nn.Module]] = {}


def build_conditioning(config: ModelConfig, bert_config: BertConfig,
                       task_names: Sequence[str]) -> nn.Module | None:
    """The configured variant, or None for the plain shared encoder."""
    if config.conditioning is None:
        return None
    if config.conditioning not in CONDITIONINGS:
        raise ConfigError(f"model.conditioning: unknown variant {config.conditioning!r}; "
                          f"known: {sorted(CONDITIONINGS)}")
    return CONDITIONINGS[config.conditioning](bert_config, list(task_names),
                                              **config.conditioning_options)
