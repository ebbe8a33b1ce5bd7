"""What routes share: the app's state, and the API-key check, as FastAPI dependencies."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from model.tokenizer import Tokenizer
from service.api.errors import APIError
from service.api.metrics import Metrics
from service.api.settings import Settings
from service.engine.async_engine import AsyncEngine


@dataclass
class AppState:
    """Everything the routes need, built once when the app starts."""

    settings: Settings
    engine: AsyncEngine
    model_name: str
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    startup_error: BaseException | None = None  # warm-up failed: /health reports it

    @property
    def tokenizer(self) -> Tokenizer:
        """The engine's tokenizer."""
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """The context window the engine enforces."""
        return self.engine.engine.max_model_len


def get_state(request: Request) -> AppState:
    """The app's state; 503 while the app has not finished starting."""
    state = getattr(request.app.state, "gptserve", None)
    if state is None:
        raise APIError(503, "the server is starting", code="not_ready")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_api_key(request: Request) -> None:
    """When API keys are configured, demand `Authorization: Bearer <key>` with one of them."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    token = bearer_token(request)
    if token is None:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = token.encode()
    matched = False
    for key in settings.api_keys:  # compare with every key, in constant time each
        matched |= hmac.compare_digest(given, key.encode())
    if not matched:
        raise APIError(
            401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
