"""Errors the command-line entry points turn into a one-line message and a non-zero exit.

Each is a ``ValueError``/``RuntimeError`` subclass so library callers can catch them the usual way.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value (or the dataset it points to) does not fit what the code needs."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: foreign, truncated, unsafe, or built for other code."""


class DeviceError(RuntimeError):
    """The requested torch device does not exist on this machine."""
