"""mtbert: one BERT encoder fine-tuned on several tasks at once.

`mtbert.load(path)` returns a trained `mtbert.api.Model` (imported on first use, so that
`import mtbert` stays cheap); `mtbert.register(kind, name, cls)` adds a technique of your own
(see docs/extending.md).
"""

__version__ = "0.1.0"

from mtbert.registry import register

_API = ("load", "Model", "Prediction", "TaskInfo")
__all__ = ["register", *_API]


def __getattr__(name: str):
    if name in _API:
        from mtbert import api

        return getattr(api, name)
    raise AttributeError(f"module 'mtbert' has no attribute {name!r}")
