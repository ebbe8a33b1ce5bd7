"""What the engine reports as it runs; the HTTP layer turns it into Prometheus metrics."""

from __future__ import annotations

from service.engine.request import Request


class EngineListener:
    """Receives engine events; subclass and override what you need. Called on the engine thread."""

    def on_step(self, num_rows: int, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        """A forward step ran with `num_rows` requests."""

    def on_request_scheduled(self, request: Request) -> None:
        """A waiting request got a cache slot (its queue time is now known)."""

    def on_token(self, request: Request, now: float) -> None:
        """A request received a token; called before its `last_token_time` moves to `now`."""

    def on_request_finished(self, request: Request) -> None:
        """A request ended; `finish_reason` says how."""

    def on_speculation(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """Speculative decoding's running totals: guesses checked and accepted."""


class EngineStats(EngineListener):
    """Running totals, readable from any thread (plain ints: reads of them are atomic)."""

    def __init__(self) -> None:
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_finished: dict[str, int] = {}

    def on_step(self, num_rows: int, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        self.num_steps += 1
        self.num_prompt_tokens += num_prompt_tokens
        self.num_generated_tokens += num_generated_tokens

    def on_request_finished(self, request: Request) -> None:
        reason = request.finish_reason.value if request.finish_reason else "unknown"
        self.num_finished[reason] = self.num_finished.get(reason, 0) + 1
