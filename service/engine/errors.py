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

    def __init__(self, num_prompt_tokens: int, num_new_tokens: int, max_model_len: int) -> None:
        total = num_prompt_tokens + num_new_tokens
        super().__init__(
            f"the prompt has {_tokens(num_prompt_tokens)} and {_tokens(num_new_tokens)} more "
            f"were asked for: {_tokens(total)} in all, more than the context window of "
            f"{_tokens(max_model_len)}; shorten the prompt, ask for fewer new tokens, or start "
            "the server with --truncate-prompt to keep the end of over-long prompts",
            "prompt",
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.num_new_tokens = num_new_tokens
        self.max_model_len = max_model_len


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


class QueueFullError(EngineError):
    """The waiting queue is at capacity; the caller should retry later."""


class EngineNotReadyError(EngineError):
    """The engine is starting, draining or stopped and takes no new requests."""


class EngineDeadError(EngineError):
    """The engine loop stopped because of an unexpected error."""


class RequestAbortedError(EngineError):
    """The server cancelled a request (shutting down, or its reader stopped reading)."""


class ModelNotUsableError(EngineError):
    """The model cannot serve: its weights or its logits are not finite numbers."""


class StepFailedError(EngineError):
    """A forward step failed; the requests in it were ended with this error."""
