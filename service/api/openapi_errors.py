"""`/openapi.json` documents the error body the server really sends, not FastAPI's 422.

FastAPI documents a 422 `HTTPValidationError` for every route that validates input; this server
answers invalid input with 400 and the `ErrorResponse` body instead (service/api/errors.py). The
schema here drops every 422, and gives each operation with a JSON body the statuses any body can
cause: invalid (400), too large (413), not sent as JSON (415), and the routes that submit to the
engine the statuses of `ROUTE_ERRORS` (a full queue, not ready or draining, an unknown model).
401 (API keys) is declared where the routers are included, 503 of the probes on their routes,
both with `error_responses`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.api.errors import ErrorResponse

ERROR_SCHEMA = "ErrorResponse"
ERROR_REF = f"#/components/schemas/{ERROR_SCHEMA}"
ERROR_DESCRIPTIONS = {
    400: "Invalid field or JSON (the field is named in `param`), or a prompt too long for the "
    "context window",
    401: "Missing or wrong API key (when the server has API keys)",
    404: "Unknown model name",
    413: "Request body larger than the server's limit",
    415: "Body not sent as `Content-Type: application/json`",
    429: "Queue full; retry after `Retry-After` seconds",
    503: "Not ready yet, draining after SIGTERM, or the engine stopped",
}
BODY_ERROR_STATUSES = (400, 413, 415)  # what any JSON body can get
# What a route answers beyond its body's and its router's errors, by (method, path).
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/generate"): (429, 503),
    ("post", "/stream"): (429, 503),
    ("post", "/v1/completions"): (404, 429, 503),
}
# FastAPI's validation-error schemas, which this server never sends.
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, each with the ErrorResponse body."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def _error_response_entry(status: int) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS.get(status, "Error"),
        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
    }


def with_real_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's OpenAPI schema (changed in place) with the real error responses, without 422."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components[ERROR_SCHEMA] = error_schema
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = ROUTE_ERRORS.get((method, path), ())
            if "requestBody" in operation:
                statuses += BODY_ERROR_STATUSES
            for status in statuses:
                responses.setdefault(str(status), {})
            for status in responses:
                if status.startswith(("4", "5")):  # every error is JSON, even on /stream
                    responses[status] = _error_response_entry(int(status))
            operation["responses"] = dict(sorted(responses.items()))
    return schema


def install_openapi_errors(app: FastAPI) -> None:
    """Make the app's `/openapi.json` (built once, on first use) document the real errors."""
    build_fastapi_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_real_errors(build_fastapi_schema())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
