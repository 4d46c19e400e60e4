"""Errors the engine raises to its callers (the frontend maps them to HTTP status codes)."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as given (HTTP 400): bad parameters, empty prompt, a
    prompt longer than the context, token ids outside the vocabulary, a duplicate id."""


class QueueFullError(EngineError):
    """The waiting queue is at its cap (HTTP 503 with Retry-After)."""


class EngineDeadError(EngineError):
    """The engine is not running (not started, shut down, or its loop crashed)."""


class CorruptLogitsError(EngineError):
    """A step's logits held NaN or Inf: the step is thrown away, nothing of it is sampled."""


class EngineQuarantinedError(EngineDeadError):
    """The engine produced corrupt output and takes no work (the frontend moves its requests
    to another worker)."""
