"""The playground at `/` and the `/v1/config` route it is built from.

The page is driven in a real headless Chromium against a real server over a tiny random-weight
model: it loads with no console error and no request to another host, streams a generation equal
to /generate's with the same seed, stops a request so the engine frees its slot, shows each
step's alternatives with the API's raw and processed probabilities, redraws them at another
temperature, asks for an API key, and shows the server's errors. The last test runs the bundled
model and, with GPTSERVE_UPDATE_SCREENSHOT=1, saves the README's screenshot.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fixtures import MODEL_NAME, LiveServer, live_server, make_engine, wait_until
from browser_fixtures import chromium, open_page

from model.sampling_params import (
    LOGPROBS_MODES,
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_TEMPERATURE,
    MIN_SEED,
)
from service.api.loader import load_engine
from service.api.schemas import GenerateRequest
from service.api.settings import Settings
from service.engine.stats import EngineListener

pytestmark = pytest.mark.timeout(90)

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"
RUNNING_GAUGE = re.compile(r"^gptserve_num_requests_running(?:\{[^}]*\})? (\S+)$", re.M)


class Throttle(EngineListener):
    """Slows every engine step by `delay` seconds, so a test can act mid-generation."""

    delay = 0.0

    def on_step(self, num_rows: int, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        if self.delay:
            time.sleep(self.delay)


@pytest.fixture(scope="module")
def throttle() -> Throttle:
    return Throttle()


@pytest.fixture(scope="module")
def server(throttle: Throttle) -> Iterator[LiveServer]:
    with live_server(engine=make_engine(listeners=(throttle,))) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(autouse=True)
def _full_speed(throttle: Throttle) -> Iterator[None]:
    yield
    throttle.delay = 0.0


def config_of(url: str, **headers: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/v1/config", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def specs_by_name(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {spec["name"]: spec for spec in config["generate_fields"]}


# --- /v1/config ---------------------------------------------------------------------------


def test_config_describes_the_model_and_every_generate_field(server: LiveServer) -> None:
    config = config_of(server.url)
    assert config["model"] == MODEL_NAME
    assert (config["device"], config["dtype"], config["quantization"]) == ("cpu", "float32", "none")
    assert config["kv_cache_dtype"] == "float32"
    assert config["max_model_len"] == 1024
    assert config["vocab_size"] == 50257
    specs = specs_by_name(config)
    assert set(specs) == set(GenerateRequest.model_fields)
    assert config["generate_fields"][0]["name"] == "prompt"
    assert specs["prompt"]["required"] and specs["prompt"]["types"] == ["string", "array"]
    temperature = specs["temperature"]
    assert temperature["types"] == ["number", "null"]
    assert (temperature["default"], temperature["minimum"], temperature["maximum"]) == (
        1.0,
        0.0,
        MAX_TEMPERATURE,
    )
    assert specs["top_p"]["exclusive_minimum"] and specs["top_p"]["maximum"] == 1.0
    assert specs["presence_penalty"]["minimum"] == -MAX_ABS_PENALTY
    assert specs["logit_bias"]["maximum"] == MAX_ABS_LOGIT_BIAS
    assert (specs["seed"]["minimum"], specs["seed"]["maximum"]) == (MIN_SEED, MAX_SEED)
    assert specs["logprobs"]["maximum"] == MAX_LOGPROBS
    assert specs["max_new_tokens"]["default"] == 64
    assert specs["logprobs_mode"]["choices"] == list(LOGPROBS_MODES)
    assert specs["logprobs_mode"]["default"] == server.settings.logprobs_mode
    assert specs["timeout"]["exclusive_minimum"] and specs["timeout"]["minimum"] == 0


def _edge_values(spec: dict[str, Any]) -> list[tuple[Any, bool]]:
    """(value, accepted) pairs at and just beyond each bound of a numeric field."""
    step = 1 if "integer" in spec["types"] else 0.5
    edges: list[tuple[Any, bool]] = []
    low, high = spec["minimum"], spec["maximum"]
    if low is not None:
        if spec["exclusive_minimum"]:
            edges += [(low, False), (low + 0.001, True)]
        else:
            edges += [(low, True), (low - step, False)]
    if high is not None:
        edges += [(high, True), (high + step, False)]
    if "integer" in spec["types"]:
        edges = [(int(value), accepted) for value, accepted in edges]
    return edges


def test_config_ranges_are_the_ones_the_server_enforces(server: LiveServer) -> None:
    specs = specs_by_name(config_of(server.url))
    checked = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for name, spec in specs.items():
            for value, accepted in _edge_values(spec):
                sent = {"0": value} if name == "logit_bias" else value
                answer = client.post(
                    "/generate", json={"prompt": "x", "max_new_tokens": 1, name: sent}
                )
                if accepted:
                    assert answer.status_code == 200, (name, value, answer.text)
                else:
                    assert answer.status_code == 400, (name, value, answer.text)
                    assert answer.json()["error"]["param"] == name, answer.text
                checked.append(name)
    assert {"temperature", "top_k", "top_p", "min_p", "seed", "logprobs"} <= set(checked)


def test_config_needs_the_key_the_api_needs() -> None:
    with live_server(api_keys=["sesame"]) as keyed:
        assert httpx.get(f"{keyed.url}/v1/config").status_code == 401
        assert config_of(keyed.url, Authorization="Bearer sesame")["model"] == MODEL_NAME
        assert httpx.get(f"{keyed.url}/").status_code == 200  # the page itself is open


# --- the page, served -----------------------------------------------------------------------


def test_serve_the_page_and_only_its_own_files(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    script = httpx.get(f"{server.url}/playground/js/main.js")
    assert script.headers["content-type"].startswith("text/javascript")
    for missing in ("/playground/nothing.js", "/playground/../routes_playground.py"):
        answer = httpx.get(f"{server.url}{missing}")
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
    traversal = httpx.get(f"{server.url}/playground/..%2Froutes_playground.py")
    assert traversal.status_code == 404


# --- the page, in a browser -------------------------------------------------------------------


def wait_ready(page: Any) -> None:
    page.wait_for_selector("body[data-state=ready]")


def fill_settings(page: Any, **settings: Any) -> None:
    for name, value in settings.items():
        selector = f"#field-{name}"
        if isinstance(value, bool):
            page.set_checked(selector, value)
        else:
            page.fill(selector, str(value))


def generate(page: Any, prompt: str, **settings: Any) -> None:
    """Type the prompt and settings, press Ctrl+Enter, wait for the run to end."""
    page.fill("#prompt", prompt)
    fill_settings(page, **settings)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("body:is([data-state=done], [data-state=error], [data-state=stopped])")


def generated_text(page: Any) -> str:
    return page.evaluate(
        "[...document.querySelectorAll('.tok.gen')].map((s) => s.textContent).join('')"
    )


def generated_ids(page: Any) -> list[int]:
    return page.evaluate(
        "[...document.querySelectorAll('.tok.gen')].map((s) => Number(s.dataset.tokenId))"
    )


def curl_body(page: Any) -> dict[str, Any]:
    """The JSON body of the page's "copy as curl" command."""
    command = page.text_content("#request-curl").replace(" \\\n", " ")
    words = shlex.split(command)
    assert words[0] == "curl"
    return json.loads(words[words.index("-d") + 1])


def panel_rows(page: Any) -> list[dict[str, Any]]:
    """The inspect panel's rows: token id, marks, and the probabilities each column holds."""
    return page.evaluate(
        """[...document.querySelectorAll('#inspect-table tbody tr')].map((tr) => {
            const p = (name) => {
                const cell = tr.querySelector('td.' + name);
                return cell && cell.dataset.p !== undefined ? Number(cell.dataset.p) : null;
            };
            return {
                id: Number(tr.dataset.tokenId),
                chosen: tr.classList.contains('chosen'),
                cut: tr.classList.contains('cut'),
                raw: p('raw'), processed: p('processed'), whatIf: p('what-if'),
            };
        })"""
    )


def softmax(logprobs: list[float], temperature: float) -> list[float]:
    weights = [math.exp(lp / temperature) for lp in logprobs]
    return [weight / sum(weights) for weight in weights]


def assert_close(got: list[float | None], expected: list[float], rel: float = 1e-5) -> None:
    """Equal up to float32 rounding: the page's run and the test's /generate run are two runs."""
    assert len(got) == len(expected)
    for value, want in zip(got, expected, strict=True):
        assert value == pytest.approx(want, rel=rel, abs=1e-9), (got, expected)


def running_requests(url: str) -> float:
    match = RUNNING_GAUGE.search(httpx.get(f"{url}/metrics").text)
    assert match, "no gptserve_num_requests_running in /metrics"
    return float(match.group(1))


def test_load_the_page_with_no_error_and_no_other_host(browser: Any, server: LiveServer) -> None:
    with open_page(browser, f"{server.url}/") as (page, record):
        wait_ready(page)
        facts = page.eval_on_selector_all(
            "#service-info dd",
            "(dds) => Object.fromEntries(dds.map((d) => [d.dataset.fact, d.textContent]))",
        )
        assert facts == {
            "model": MODEL_NAME,
            "device": "cpu",
            "dtype": "float32",
            "context": "1024 tokens",
        }
        specs = specs_by_name(config_of(server.url))
        for name in specs:
            if name in ("prompt", "logprobs_mode"):
                continue
            field = page.locator(f"#field-{name}")
            assert field.count() == 1, name
            hint = page.text_content(f"#field-{name}-hint")
            assert f"{name} · default" in hint, hint
        temperature = page.locator("#field-temperature")
        assert temperature.input_value() == "1"
        assert temperature.get_attribute("min") == "0"
        assert temperature.get_attribute("max") == str(int(MAX_TEMPERATURE))
        assert page.locator("#field-top_k").get_attribute("min") == "-1"
        assert page.locator("#field-max_new_tokens").get_attribute("max") == "1024"
        assert "[0, 100]" in page.text_content("#field-temperature-hint")
        page.wait_for_load_state("networkidle")
        assert record.errors == []
        assert record.requests, "no request recorded"
        assert record.foreign_requests(server.url) == []


def test_generate_streams_the_text_generate_gives_with_the_seed(
    browser: Any, server: LiveServer, tmp_path: Path
) -> None:
    settings = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 1234}
    with open_page(browser, f"{server.url}/") as (page, record):
        wait_ready(page)
        generate(page, "Hello there", max_new_tokens=24, ignore_eos=True, **settings)
        assert page.get_attribute("body", "data-state") == "done"
        text = generated_text(page)
        body = curl_body(page)
        assert body == {
            "prompt": "Hello there",
            "max_new_tokens": 24,
            "ignore_eos": True,
            **settings,
            "logprobs": 10,
            "prompt_logprobs": 10,
            "logprobs_mode": "raw_and_processed_logprobs",
        }
        answer = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()
        assert text == answer["text"] and text
        assert generated_ids(page) == answer["token_ids"]
        stats = page.text_content("#stats")
        usage = answer["usage"]
        assert "first token after" in stats and "tokens/s" in stats
        assert f"{usage['prompt_tokens']} prompt tokens" in stats
        assert "24 generated" in stats and "seed 1234" in stats

        # The same settings with the openai client on /v1/completions give the same text.
        snippet = page.text_content("#request-python")
        assert "seed=1234" in snippet and '"top_k": 20' in snippet
        script = tmp_path / "reproduce.py"
        script.write_text(snippet, encoding="utf-8")
        ran = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            timeout=60,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )
        assert ran.returncode == 0, ran.stderr.decode()
        assert ran.stdout.decode("utf-8") == text + "\n"
        assert record.errors == []
        assert record.foreign_requests(server.url) == []


def test_inspect_a_token_raw_processed_and_at_another_temperature(
    browser: Any, server: LiveServer
) -> None:
    temperature, top_k = 0.7, 5
    with open_page(browser, f"{server.url}/") as (page, _):
        wait_ready(page)
        generate(page, "The cat", max_new_tokens=8, temperature=temperature, top_k=top_k)
        # The same request on /generate: the same tokens, and the log-probabilities of each step.
        answer = httpx.post(f"{server.url}/generate", json=curl_body(page), timeout=30).json()
        assert generated_ids(page) == answer["token_ids"]

        for step in (0, 5):
            page.hover(f'.tok.gen[data-step="{step}"]')
            assert page.get_attribute("#inspect", "data-step") == str(step)
            entry = answer["logprobs"][step]
            tops = entry["top_logprobs"]
            rows = panel_rows(page)
            assert [row["id"] for row in rows] == [top["token_id"] for top in tops]
            assert [row["id"] for row in rows if row["chosen"]] == [entry["token_id"]]
            # Raw: the model's softmax, as the API gives it for this step.
            assert_close([row["raw"] for row in rows], [math.exp(top["logprob"]) for top in tops])
            # Processed: the API's values, and they are softmax(log p / T) over the top-k,
            # renormalised; the candidates top-k cut off are marked and have none.
            shown = [row["processed"] for row in rows[:top_k]]
            assert_close(shown, [math.exp(top["processed_logprob"]) for top in tops[:top_k]])
            assert_close(shown, softmax([top["logprob"] for top in tops[:top_k]], temperature))
            assert all(row["cut"] and row["processed"] is None for row in rows[top_k:])
            assert all(top["processed_logprob"] is None for top in tops[top_k:])
            # The what-if column starts at the request's temperature.
            logprobs = [top["logprob"] for top in tops]
            assert_close([row["whatIf"] for row in rows], softmax(logprobs, temperature))

        # The slider, by keyboard: Home is 0 (greedy: all on the most likely), then 30 steps
        # of 0.05 make 1.5.
        page.focus("#what-if-temperature")
        page.keyboard.press("Home")
        assert [row["whatIf"] for row in panel_rows(page)] == [1] + [0] * (len(logprobs) - 1)
        for _ in range(30):
            page.keyboard.press("ArrowRight")
        assert page.text_content("#what-if-value") == "1.50"
        assert_close([row["whatIf"] for row in panel_rows(page)], softmax(logprobs, 1.5))
        raw_after = [row["raw"] for row in panel_rows(page)]
        assert_close(raw_after, [math.exp(lp) for lp in logprobs])  # raw stays

        # Prompt tokens show the model's expectation at their position.
        page.hover('.tok.prompt[data-step="0"]')
        assert page.get_attribute("#inspect", "data-kind") == "prompt"
        assert panel_rows(page) == []  # the first prompt token has nothing before it
        page.hover('.tok.prompt[data-step="1"]')
        expected = answer["prompt_logprobs"][1]
        tops = expected["top_logprobs"]
        top_ids = [top["token_id"] for top in tops]
        rows = panel_rows(page)
        # The model's top alternatives, then the prompt's own token if it is not among them.
        outside = [] if expected["token_id"] in top_ids else [expected["token_id"]]
        assert [row["id"] for row in rows] == top_ids + outside
        assert [row["id"] for row in rows if row["chosen"]] == [expected["token_id"]]
        raws = [math.exp(top["logprob"]) for top in tops]
        if outside:
            raws.append(math.exp(expected["logprob"]))
        assert_close([row["raw"] for row in rows], raws)

        # The arrow keys walk the tokens, and the panel follows.
        page.focus('.tok.gen[data-step="2"]')
        page.keyboard.press("ArrowRight")
        assert page.get_attribute("#inspect", "data-step") == "3"
        assert page.evaluate("document.activeElement.dataset.step") == "3"


def test_stop_aborts_the_request_and_frees_its_slot(
    browser: Any, server: LiveServer, throttle: Throttle
) -> None:
    throttle.delay = 0.03
    with open_page(browser, f"{server.url}/") as (page, _):
        wait_ready(page)
        page.fill("#prompt", "Once")
        fill_settings(page, max_new_tokens=900, ignore_eos=True)
        page.click("#generate")
        # Tokens arrive while the request runs: the page streams them.
        page.locator(".tok.gen").nth(2).wait_for()
        assert page.get_attribute("body", "data-state") == "running"
        assert running_requests(server.url) == 1
        page.click("#stop")
        page.wait_for_selector("body[data-state=stopped]")
        assert wait_until(lambda: running_requests(server.url) == 0, timeout=5)
        assert wait_until(lambda: server.num_live == 0, timeout=5)
        shown = page.locator(".tok.gen").count()
        assert 3 <= shown < 900
        assert page.text_content("#run-state") == f"Stopped after {shown} tokens"
        time.sleep(0.3)
        assert page.locator(".tok.gen").count() == shown

        # From the keyboard: Ctrl+Enter starts, Esc stops.
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")
        page.locator(".tok.gen").nth(2).wait_for()
        page.keyboard.press("Escape")
        page.wait_for_selector("body[data-state=stopped]")
        assert wait_until(lambda: running_requests(server.url) == 0, timeout=5)


def test_ask_for_the_api_key_then_work(browser: Any) -> None:
    with (
        live_server(api_keys=["sesame"]) as keyed,
        open_page(browser, f"{keyed.url}/") as (page, _),
    ):
        page.wait_for_selector("#key-dialog[open]")
        assert "missing API key" in page.text_content("#key-message")
        page.fill("#key-input", "wrong")
        page.keyboard.press("Enter")
        page.wait_for_selector("#key-message:has-text('invalid API key')")
        page.fill("#key-input", "sesame")
        page.click("#key-dialog button[value=save]")
        wait_ready(page)
        assert page.text_content('#service-info dd[data-fact="model"]') == MODEL_NAME
        generate(page, "Hi", max_new_tokens=4, seed=3)
        assert page.get_attribute("body", "data-state") == "done"
        assert page.locator(".tok.gen").count() == 4
        storage = page.evaluate("[sessionStorage.getItem('gptserve.apiKey'), localStorage.length]")
        assert storage == ["sesame", 0]  # kept for the tab only
        curl = page.text_content("#request-curl")
        python = page.text_content("#request-python")
        assert "$GPTSERVE_API_KEY" in curl and 'os.environ["GPTSERVE_API_KEY"]' in python
        assert "sesame" not in curl + python


def test_show_the_servers_400_message(browser: Any, server: LiveServer) -> None:
    with open_page(browser, f"{server.url}/") as (page, _):
        wait_ready(page)
        generate(page, "Hi", top_p=0)
        assert page.get_attribute("body", "data-state") == "error"
        answer = httpx.post(f"{server.url}/generate", json=curl_body(page))
        assert answer.status_code == 400
        message = answer.json()["error"]["message"]
        assert "top_p" in message
        assert message in page.text_content("#error")
        assert "The server answered 400" in page.text_content("#error")
        assert page.get_attribute("#field-top_p", "aria-invalid") == "true"


def _sse(*events: Any, done: bool = True) -> str:
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    return "".join(lines) + ("data: [DONE]\n\n" if done else "")


TOKEN_EVENT = {"token": {"id": 40, "text": "I", "logprob": -1.0, "top_logprobs": []}}
ERROR_BODY = {"type": "server_error", "param": None}


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (
            429,
            {"Retry-After": "2", "Content-Type": "application/json"},
            json.dumps({"error": {**ERROR_BODY, "message": "the queue is full", "code": "busy"}}),
            ["The server answered 429 (busy)", "the queue is full", "Retry after 2 s."],
        ),
        (
            503,
            {"Content-Type": "application/json"},
            json.dumps({"error": {**ERROR_BODY, "message": "the server is shutting down"}}),
            ["The server answered 503", "the server is shutting down"],
        ),
        (
            200,
            {"Content-Type": "text/event-stream"},
            _sse(TOKEN_EVENT, done=False),
            ["The stream was cut off", "after 1 token: the output is incomplete"],
        ),
        (
            200,
            {"Content-Type": "text/event-stream"},
            _sse(TOKEN_EVENT, {"error": {**ERROR_BODY, "message": "the engine stopped"}}),
            ["The generation failed after it started", "the engine stopped"],
        ),
    ],
    ids=["429", "503", "dropped-stream", "error-event"],
)
def test_say_what_went_wrong(
    browser: Any,
    server: LiveServer,
    status: int,
    headers: dict[str, str],
    body: str,
    expected: list[str],
) -> None:
    with open_page(browser, f"{server.url}/") as (page, _):
        wait_ready(page)
        page.route(
            "**/stream",
            lambda route: route.fulfill(status=status, headers=headers, body=body),
        )
        generate(page, "Hi", max_new_tokens=4)
        assert page.get_attribute("body", "data-state") == "error"
        shown = page.text_content("#error")
        for part in expected:
            assert part in shown, shown


def test_fit_a_phone_screen_in_dark_mode(browser: Any, server: LiveServer) -> None:
    with open_page(browser, f"{server.url}/", width=360, height=740, color_scheme="dark") as (
        page,
        record,
    ):
        wait_ready(page)
        generate(page, "Hi", max_new_tokens=6, top_k=3, seed=5)
        page.click('.tok.gen[data-step="1"]')
        assert page.get_attribute("#inspect", "data-step") == "1"
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        fits = "(el) => el.scrollWidth <= el.clientWidth"
        assert page.eval_on_selector("#inspect .table-wrap", fits)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(part) for part in re.findall(r"\d+", background)[:3])
        assert red + green + blue < 3 * 64, background  # the system's dark scheme
        assert record.errors == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_play_with_the_bundled_model(browser: Any) -> None:
    """The README's screenshot: saved to docs/playground.png with GPTSERVE_UPDATE_SCREENSHOT=1."""
    engine, name = load_engine(Settings(device="cpu", warm_up=False))
    with (
        live_server(engine=engine, served_model_name=name) as bundled,
        open_page(browser, f"{bundled.url}/", width=1440, height=1000) as (page, record),
    ):
        wait_ready(page)
        assert page.text_content('#service-info dd[data-fact="model"]') == name
        generate(
            page,
            "ROMEO:\nWhat light through yonder window breaks?\n\nJULIET:\n",
            max_new_tokens=60,
            temperature=0.8,
            top_k=40,
            seed=7,
        )
        assert page.get_attribute("body", "data-state") == "done"
        assert generated_text(page).strip()
        # Show a step where the model hesitated: a word drawn though it was not the favourite.
        for step in range(3, 60):
            page.hover(f'.tok.gen[data-step="{step}"]')
            chosen = page.locator("#inspect-table tr.chosen td.rank").text_content()
            if chosen != "1" and re.fullmatch(
                r"\s?[A-Za-z]{3,}", page.text_content(".tok.selected")
            ):
                break
        page.mouse.move(0, 0)  # the panel keeps the last token shown
        page.evaluate("document.activeElement.blur()")
        assert record.errors == []
        if os.environ.get("GPTSERVE_UPDATE_SCREENSHOT") == "1":
            page.screenshot(path=str(SCREENSHOT), full_page=False)
