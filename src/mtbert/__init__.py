"""mtbert: one BERT encoder fine-tuned on several tasks at once.

`mtbert.load(path)` returns a trained `mtbert.api.Model` (imported on first use, so that
`import mtbert` stays cheap).
"""

__version__ = "0.1.0"

_API = ("load", "Model", "Prediction", "TaskInfo")


def __getattr__(name: str):
    if name in _API:
        from mtbert import api

        return getattr(api, name)
    raise AttributeError(f"module 'mtbert' has no attribute {name!r}")
