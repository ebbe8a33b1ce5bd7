"""Liveness, readiness and Prometheus metrics: open even when API keys are set.

`HEAD /health` and `HEAD /ready` answer with the same status and headers as GET, without a body,
for probes that only look at the status.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.dependencies import StateDep
from service.api.errors import APIError
from service.api.openapi_errors import error_responses

router = APIRouter(tags=["operations"])


@router.get("/health", responses=error_responses(503))
@router.head("/health", include_in_schema=False)
async def health(state: StateDep) -> dict[str, str]:
    """Liveness: 200 while the process and the engine loop are alive (or still starting)."""
    engine = state.engine
    if state.startup_error is not None:
        raise APIError(503, f"the engine failed to start: {state.startup_error!r}", code="dead")
    if engine.error is not None or (engine.is_ready and not engine.is_alive):
        raise APIError(503, "the engine loop is not running", code="engine_dead")
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
@router.head("/ready", include_in_schema=False)
async def ready(state: StateDep) -> dict[str, str]:
    """Readiness: 200 once the model is loaded and warmed up; 503 before, and while draining."""
    engine = state.engine
    if engine.is_draining:
        raise APIError(503, "the server is shutting down", code="draining")
    if not engine.is_ready or not engine.is_alive:
        raise APIError(503, "the model is loading or warming up", code="not_ready")
    return {"status": "ready", "model": state.model_name}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
