"""The error every configuration check raises, in a module of its own so that any module may raise it (the config
loader, the fault-plan grammar, the data pipeline) without importing the config loader or being imported by it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or impossible; the message names the field and the fix."""
