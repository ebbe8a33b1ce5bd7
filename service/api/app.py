"""The FastAPI app: routers, error handlers, middleware, and the engine's life."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import (
    routes_config,
    routes_docs,
    routes_generate,
    routes_health,
    routes_openai,
    routes_playground,
    routes_tokenize,
)
from service.api.dependencies import AppState, require_api_key
from service.api.errors import install_error_handlers
from service.api.loader import load_engine
from service.api.metrics import Metrics
from service.api.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from service.api.openapi_errors import error_responses, install_openapi_errors
from service.api.settings import Settings
from service.engine.async_engine import AsyncEngine
from service.version import package_version

logger = logging.getLogger(__name__)

DESCRIPTION = """A batched GPT-2 text-generation service.

`/generate` and `/stream` are this server's own API; `/v1/completions` and `/v1/models` follow
OpenAI's. Errors are always `{"error": {"message", "type", "param", "code"}}`. When API keys are
configured, the generation and tokenizer routes need `Authorization: Bearer <key>`.
"""


async def _start_engine(state: AppState) -> None:
    """Warm the engine up in the background, so /health answers while it does."""
    engine = state.engine
    if engine.is_ready:
        return
    try:
        await engine.start(warm_up=state.settings.warm_up)
        logger.info("ready: serving %s", state.model_name)
    except Exception as exc:  # /health turns 503; the process stays up to say why
        logger.exception("the engine failed to start")
        state.startup_error = exc


def create_app(
    settings: Settings | None = None,
    engine: AsyncEngine | None = None,
    model_name: str | None = None,
) -> FastAPI:
    """Build the app; without `engine`, the model named by `settings` is loaded at startup.

    The app owns the engine it is given: it starts it (if not started) and shuts it down.
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        name: str | None = model_name
        if engine is None:
            served, name = await asyncio.to_thread(load_engine, settings)
        else:
            served = engine
        metrics.attach(served.engine)
        state = AppState(
            settings=settings,
            engine=served,
            model_name=settings.served_model_name or name or "gptserve",
            metrics=metrics,
        )
        app.state.gptserve = state
        starting = asyncio.create_task(_start_engine(state))
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await served.shutdown()

    app = FastAPI(
        title="gptserve",
        description=DESCRIPTION,
        version=package_version(),
        lifespan=lifespan,
        docs_url=None,  # served by routes_docs, with Swagger UI from the package
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app, settings.retry_after)

    protected = [Depends(require_api_key)]
    app.include_router(routes_health.router)
    app.include_router(routes_playground.router)  # the page; it asks for a key when needed
    app.include_router(routes_docs.router)
    for module in (routes_config, routes_generate, routes_openai, routes_tokenize):
        app.include_router(module.router, dependencies=protected, responses=error_responses(401))
    install_openapi_errors(app)

    # Added last = outermost: CORS headers go on every answer, the request id's included.
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
    return app
