"""Errors every layer raises, in a module that imports nothing of mtbert (no cycles)."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""
