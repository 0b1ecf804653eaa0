"""mtbert: one BERT encoder fine-tuned on several tasks at once."""

__version__ = "0.1.0"
