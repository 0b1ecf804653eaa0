"""Registries: the named implementations of each kind of technique.

A registry is the source of truth for its kind: config validation checks names against it
(an unknown name lists the registered ones) and builders look classes up in it. A technique
from outside mtbert joins without an edit to mtbert, in one of two ways:

- a call, before the config is read: `mtbert.register("weighting", "half", HalfWeighting)`;
- an entry point in the group `mtbert.<kinds>` of the package that ships it, e.g. in its
  `pyproject.toml`: `[project.entry-points."mtbert.weightings"] half = "pkg.mod:HalfWeighting"`,
  loaded the first time the registry is read.

What a technique must declare for the rest of the system is written on its kind's base class
(`LossWeighting`, `GradientCombiner`, `TaskSampler`, the loss and head protocols in
`losses/__init__.py` and `model/heads.py`, `model/conditioning/base.py`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)


class Registry(Mapping[str, Any]):
    """Name -> implementation for one kind; reading it loads the kind's entry points once."""

    def __init__(self, kind: str, entries: dict[str, Any], plural: str | None = None):
        self.kind = kind
        self.group = f"mtbert.{plural or kind + 's'}"  # the entry-point group
        self._entries = dict(entries)
        self._plugins_loaded = False

    def register(self, name: str, implementation: Any, replace: bool = False) -> Any:
        """Add `implementation` under `name`; a taken name needs `replace=True`."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries and not replace and self._entries[name] is not implementation:
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"({self._entries[name]!r}); pass replace=True to override it")
        self._entries[name] = implementation
        return implementation

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for point in entry_points(group=self.group):
            if point.name in self._entries:
                continue  # built-ins and explicit registrations win
            try:
                self._entries[point.name] = point.load()
            except Exception as error:  # noqa: BLE001 - a broken plugin must not stop mtbert
                log.warning("cannot load %s plugin %r (%s): %s", self.kind, point.name,
                            point.value, error)

    def __getitem__(self, name: str) -> Any:
        self._load_plugins()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)


# kind -> (module, registry attribute): imported on first use, so `import mtbert` stays light.
_REGISTRIES = {
    "weighting": ("mtbert.balancing", "WEIGHTINGS"),
    "combiner": ("mtbert.balancing", "COMBINERS"),
    "sampler": ("mtbert.data.sampling", "SAMPLERS"),
    "loss": ("mtbert.losses", "LOSSES"),
    "positive_rule": ("mtbert.losses", "POSITIVE_RULES"),
    "auxiliary_loss": ("mtbert.losses", "AUXILIARY_LOSSES"),
    "head": ("mtbert.model.heads", "HEADS"),
    "conditioning": ("mtbert.model.conditioning", "CONDITIONINGS"),
    "regularizer": ("mtbert.regularizers", "REGULARIZERS"),
    "weight_average": ("mtbert.weight_averaging", "AVERAGES"),
}


def registry(kind: str) -> Registry:
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(_REGISTRIES)}")
    module, attribute = _REGISTRIES[kind]
    return getattr(importlib.import_module(module), attribute)


def register(kind: str, name: str, implementation: Any, replace: bool = False) -> Any:
    """Register a technique of `kind` (weighting, combiner, sampler, loss, positive_rule,
    auxiliary_loss, head, conditioning, regularizer, weight_average) under `name`; returns it,
    so it also works as a decorator's body."""
    return registry(kind).register(name, implementation, replace)
