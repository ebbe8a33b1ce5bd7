"""Errors as documented and as sent: `/openapi.json` lists exactly the error statuses each route
answers, with the one error body the server really sends; and error messages say what to do."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
from api_fixtures import MODEL_NAME, LiveServer, live_server, wait_until

from service.api.errors import ErrorResponse

pytestmark = pytest.mark.timeout(60)

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_BYTES = 4000
BODIES = {
    "/generate": {"prompt": "x", "max_new_tokens": 2},
    "/stream": {"prompt": "x", "max_new_tokens": 2},
    "/v1/completions": {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2},
    "/tokenize": {"prompt": "x"},
    "/detokenize": {"tokens": [1]},
}
ENGINE_ROUTES = ("/generate", "/stream", "/v1/completions")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(
        max_batch_size=1, max_queue_size=0, api_keys=[KEY], max_body_bytes=MAX_BODY_BYTES
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as http:
        yield http


@pytest.fixture(scope="module")
def openapi(client: httpx.Client) -> dict:
    return client.get("/openapi.json").json()


def error_of(response: httpx.Response) -> dict:
    """The response's error, checked against the ErrorResponse model (no field more or less)."""
    assert response.headers["content-type"] == "application/json"
    return ErrorResponse.model_validate_json(response.content).error.model_dump()


def test_document_the_error_body_instead_of_422(openapi: dict) -> None:
    text = json.dumps(openapi)
    assert '"422"' not in text and "HTTPValidationError" not in text
    schemas = openapi["components"]["schemas"]
    expected = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in expected.pop("$defs").items():
        assert schemas[name] == schema
    assert schemas["ErrorResponse"] == expected
    for operations in openapi["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    content = response["content"]["application/json"]["schema"]
                    assert content == {"$ref": "#/components/schemas/ErrorResponse"}


def provoke_every_error(
    server: LiveServer, client: httpx.Client, openapi: dict
) -> set[tuple[str, str, int]]:
    """Send each route every error it can answer; return the (method, path, status) seen."""
    seen: set[tuple[str, str, int]] = set()

    def check(method: str, path: str, response: httpx.Response, status: int) -> None:
        assert response.status_code == status, (method, path, response.text)
        error_of(response)
        seen.add((method, path, status))

    # What any route with a JSON body answers, and any route behind the API key.
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            body = BODIES.get(path, {})
            if "requestBody" in operation:
                sent = client.request(method, path, json={**body, "bogus": 1})
                check(method, path, sent, 400)
                big = {**body, "padding": "x" * MAX_BODY_BYTES}
                check(method, path, client.request(method, path, json=big), 413)
                as_text = {"content-type": "text/plain"}
                text = client.request(method, path, content=json.dumps(body), headers=as_text)
                check(method, path, text, 415)
            if path not in ("/health", "/ready", "/metrics"):
                without_key = httpx.request(method, server.url + path, json=body or None)
                if without_key.status_code == 401:
                    check(method, path, without_key, 401)
    wrong_model = {**BODIES["/v1/completions"], "model": "nope"}
    check("post", "/v1/completions", client.post("/v1/completions", json=wrong_model), 404)

    # 429: the one slot is busy and nothing may wait.
    first_token = threading.Event()

    def hold_the_slot() -> None:
        body = {"prompt": "x", "max_new_tokens": 500, "ignore_eos": True}
        with client.stream("POST", "/stream", json=body) as response:
            for _ in response.iter_lines():
                first_token.set()

    holder = threading.Thread(target=hold_the_slot, daemon=True)
    holder.start()
    assert first_token.wait(timeout=30)
    for path in ENGINE_ROUTES:
        check("post", path, client.post(path, json=BODIES[path]), 429)
    holder.join(timeout=60)
    assert wait_until(lambda: server.num_live == 0, timeout=10)

    # 503: draining (as after SIGTERM).
    server.engine.is_draining = True
    try:
        for path in ENGINE_ROUTES:
            check("post", path, client.post(path, json=BODIES[path]), 503)
        check("get", "/ready", client.get("/ready"), 503)
        check("get", "/health", _engine_dead_health(server, client), 503)
    finally:
        server.engine.is_draining = False
    return seen


def _engine_dead_health(server: LiveServer, client: httpx.Client) -> httpx.Response:
    """/health with the engine marked as failed, then the mark taken back."""
    server.engine.error = RuntimeError("marked as dead for the test")
    try:
        return client.get("/health")
    finally:
        server.engine.error = None


def test_document_exactly_the_errors_the_server_sends(
    server: LiveServer, client: httpx.Client, openapi: dict
) -> None:
    documented = {
        (method, path, int(status))
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
        for status in operation["responses"]
        if status.startswith(("4", "5"))
    }
    assert provoke_every_error(server, client, openapi) == documented


def test_send_413_in_the_same_shape_and_format_as_every_error(client: httpx.Client) -> None:
    too_big = client.post("/generate", json={"prompt": "x" * MAX_BODY_BYTES})
    invalid = client.post("/generate", json={"prompt": "x", "temperature": -1})
    assert (too_big.status_code, invalid.status_code) == (413, 400)
    for response in (too_big, invalid):
        error_of(response)
        compact = json.dumps(response.json(), separators=(",", ":"), ensure_ascii=False)
        assert response.content == compact.encode()
        assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_say_that_the_content_type_is_the_problem(
    server: LiveServer, content_type: str | None
) -> None:
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    body = json.dumps({"prompt": "x"}).encode()
    response = httpx.post(server.url + "/generate", content=body, headers=headers)
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]
    assert (content_type or "no Content-Type") in error["message"]


def test_accept_json_content_types_with_parameters(client: httpx.Client) -> None:
    body = json.dumps(BODIES["/tokenize"])
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = client.post("/tokenize", content=body, headers={"content-type": content_type})
        assert response.status_code == 200, content_type


@pytest.mark.parametrize(
    ("path", "field", "hint"),
    [
        ("/generate", "max_tokens", "use 'max_new_tokens'"),
        ("/stream", "max_tokens", "use 'max_new_tokens'"),
        ("/generate", "stream", "POST the same body to /stream"),
        ("/v1/completions", "max_new_tokens", "use 'max_tokens'"),
        ("/v1/completions", "messages", "send a 'prompt'"),
    ],
)
def test_name_the_right_field(client: httpx.Client, path: str, field: str, hint: str) -> None:
    response = client.post(path, json={**BODIES[path], field: 8})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == field and error["code"] == "unknown_field"
    assert hint in error["message"]


def test_point_chat_clients_to_the_completions_api(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": []})
    assert response.status_code == 404
    message = error_of(response)["message"]
    assert "completions API for base" in message and "/v1/completions" in message


def test_name_the_route_and_the_allowed_method(client: httpx.Client) -> None:
    unknown = error_of(client.get("/nope"))
    assert unknown["code"] == "not_found" and "GET /nope" in unknown["message"]
    wrong_method = client.get("/generate")
    assert wrong_method.status_code == 405
    assert "use POST" in error_of(wrong_method)["message"]
