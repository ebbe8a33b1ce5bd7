"""Errors the engine raises; the HTTP layer maps each to one status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot run as given (bad parameter, prompt too long)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested new tokens do not fit the model's context window."""


class QueueFullError(EngineError):
    """The waiting queue is at capacity; the caller should retry later."""


class EngineNotReadyError(EngineError):
    """The engine is starting, draining or stopped and takes no new requests."""


class EngineDeadError(EngineError):
    """The engine loop stopped because of an unexpected error."""


class StepFailedError(EngineError):
    """A forward step failed; the requests in it were ended with this error."""
