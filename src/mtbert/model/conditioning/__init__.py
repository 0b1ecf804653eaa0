"""Task-aware encoders: modules that change the encoder's computation for the task it serves.

Each variant is an `nn.Module` with `hooks(task) -> EncoderHooks` (see `model/bert.py`) and
lives in a file of its own; `CONDITIONINGS` maps the config name to the class.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from mtbert.errors import ConfigError
from mtbert.model.bert import BertConfig
from mtbert.model.conditioning.attention import TaskEmbeddedAttention
from mtbert.model.conditioning.input import InputTaskEmbedding
from mtbert.model.conditioning.lora import LoRA
from mtbert.model.conditioning.mtl_lora import MultiTaskLoRA
from mtbert.model.conditioning.pals import ProjectedAttentionLayers
from mtbert.model.conditioning.projected import ProjectedTaskAttention
from mtbert.model.conditioning.projected_activation import ProjectedActivationTaskAttention
from mtbert.registry import Registry

if TYPE_CHECKING:
    from mtbert.config import ModelConfig

CONDITIONINGS = Registry("conditioning", {
    "input": InputTaskEmbedding,
    "attention": TaskEmbeddedAttention,
    "projected": ProjectedTaskAttention,
    "projected_activation": ProjectedActivationTaskAttention,
    "pals": ProjectedAttentionLayers,
    "lora": LoRA,
    "mtl_lora": MultiTaskLoRA,
})


def build_conditioning(config: ModelConfig, bert_config: BertConfig,
                       task_names: Sequence[str]) -> nn.Module | None:
    """The configured variant, or None for the plain shared encoder."""
    if config.conditioning is None:
        return None
    if config.conditioning not in CONDITIONINGS:
        raise ConfigError(f"model.conditioning: unknown variant {config.conditioning!r}; "
                          f"known: {sorted(CONDITIONINGS)}")
    variant = CONDITIONINGS[config.conditioning]
    known = [p.name for p in inspect.signature(variant).parameters.values()
             if p.kind is p.KEYWORD_ONLY]
    for option in config.conditioning_options:
        if option not in known:
            raise ConfigError(f"model.conditioning_options.{option}: unknown option for "
                              f"{config.conditioning!r}; known: {known}")
    try:
        return variant(bert_config, list(task_names), **config.conditioning_options)
    except ValueError as error:
        raise ConfigError(f"model.conditioning {config.conditioning!r}: {error}") from None
