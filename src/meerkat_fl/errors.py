"""One base error and a few families; each message names the offending key, file or client."""

from __future__ import annotations


class MeerkatError(Exception):
    """Base class of every error meerkat-fl raises on bad input."""


class ConfigError(MeerkatError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(MeerkatError):
    """A data file or dataset is missing, malformed, or cannot be split as asked."""


class ModelError(MeerkatError):
    """A model path, hub id or GGUF file cannot be loaded."""


class MaskMismatch(MeerkatError):
    """A mask or patch file does not belong to the model it is used with, or is malformed."""


class MessageRejected(MeerkatError):
    """A client or server message is malformed, hostile, or inconsistent with the round."""
