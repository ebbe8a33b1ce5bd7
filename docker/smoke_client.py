"""Check a running gptserve container from the host: docker/container-test.sh's HTTP client.

Uses only the standard library, so it runs on a bare CI machine. Each subcommand prints one
line on success and exits 1 with the reason on failure:

    smoke_client.py ready    URL [--timeout S] [--container NAME]
    smoke_client.py generate URL
    smoke_client.py stream   URL
    smoke_client.py metrics  URL FILE...   (every gptserve_* name in FILE must be served)
    smoke_client.py drain    URL --container NAME [--max-new-tokens N] [--stop-timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

DOCKER = os.environ.get("DOCKER", "docker")
PROMPT = "The meaning of life is"


class CheckError(Exception):
    """A check failed; the message says what was expected and what came back."""


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> Any:
    """POST `body` as JSON and return the open response (raises HTTPError on 4xx/5xx)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def container_state(name: str) -> str:
    """`running`, `exited`, ... as Docker reports it."""
    result = subprocess.run(
        [DOCKER, "inspect", "-f", "{{.State.Status}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "gone"


def wait_ready(base: str, timeout: float, container: str | None) -> str:
    """Poll /ready until it answers 200; fail early if the container stops."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=5) as response:
                body = json.load(response)
                return f"ready after {time.monotonic() - start:.1f} s: {body}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:  # refused or reset while the server starts
            last = type(exc).__name__
        if container is not None and container_state(container) != "running":
            raise CheckError(f"container {container} is {container_state(container)}")
        time.sleep(0.5)
    raise CheckError(f"/ready not 200 after {timeout:.0f} s (last: {last})")


def check_generate(base: str) -> str:
    """POST /generate gives text and a usage count that matches the tokens generated."""
    body = {"prompt": PROMPT, "max_new_tokens": 16, "temperature": 0.0}
    with post(base + "/generate", body) as response:
        answer = json.load(response)
    text, usage = answer.get("text"), answer.get("usage", {})
    if not isinstance(text, str):
        raise CheckError(f"/generate answered without text: {answer}")
    if usage.get("completion_tokens") != len(answer.get("token_ids", [])) or not text:
        raise CheckError(f"/generate gave no tokens or a wrong usage: {answer}")
    return f"/generate: {usage['completion_tokens']} tokens, text {text[:60]!r}"


def stream_events(base: str, body: dict[str, Any]) -> Iterator[str]:
    """The `data:` payloads of a POST /stream, in order, `[DONE]` included."""
    with post(base + "/stream", body, timeout=300) as response:
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise CheckError(f"/stream content type is {response.headers.get('Content-Type')}")
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                yield line[len("data:") :].strip()


def parse_stream(payloads: list[str]) -> list[dict[str, Any]]:
    """Check the shape of a whole stream: token events, then `[DONE]`; return the tokens."""
    if not payloads or payloads[-1] != "[DONE]":
        raise CheckError(f"stream did not end with [DONE]; last events: {payloads[-3:]}")
    events = [json.loads(payload) for payload in payloads[:-1]]
    errors = [event for event in events if "error" in event]
    if errors or not events:
        raise CheckError(f"stream had errors or no tokens: {errors or payloads}")
    if "finish_reason" not in events[-1]:
        raise CheckError(f"last token event has no finish_reason: {events[-1]}")
    return events


def check_stream(base: str) -> str:
    """POST /stream gives one event per token and ends with `[DONE]`."""
    body = {"prompt": PROMPT, "max_new_tokens": 16, "ignore_eos": True}
    events = parse_stream(list(stream_events(base, body)))
    if len(events) != 16:
        raise CheckError(f"asked for 16 tokens with ignore_eos, got {len(events)} events")
    text = events[-1].get("generated_text", "")
    return f"/stream: {len(events)} token events + [DONE], text {text[:60]!r}"


def check_metrics(base: str, files: list[str]) -> str:
    """Every `gptserve_*` series that the dashboard and autoscaler query is really served."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        exposition = response.read().decode()
    served = {
        line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line[:1] != "#"
    }
    wanted: set[str] = set()
    for path in files:
        with open(path, encoding="utf-8") as handle:
            wanted.update(re.findall(r"\bgptserve_[a-z0-9_]+", handle.read()))
    missing = sorted(wanted - served)
    if missing:
        raise CheckError(f"queried but not served by /metrics: {missing}")
    return f"/metrics: serves all {len(wanted)} series that {len(files)} config files query"


def try_generate(base: str) -> str:
    """What a new request gets: `HTTP <code>` or the connection error's name."""
    try:
        with post(base + "/generate", {"prompt": PROMPT, "max_new_tokens": 1}, timeout=10) as r:
            return f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except OSError as exc:
        return type(exc).__name__


def check_drain(base: str, container: str, max_new_tokens: int, stop_timeout: int) -> str:
    """`docker stop` during a stream: the stream finishes, new work is refused, exit code 0."""
    received: list[tuple[float, str]] = []
    failure: list[BaseException] = []
    first_token = threading.Event()
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as response:
        context = json.load(response)["data"][0]["max_model_len"]
    max_new_tokens = min(max_new_tokens, context - 16)  # room for the prompt
    body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens, "ignore_eos": True}

    def read() -> None:
        try:
            for payload in stream_events(base, body):
                received.append((time.monotonic(), payload))
                first_token.set()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            first_token.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not first_token.wait(120) or not received:
        raise CheckError(f"the long stream never started: {failure}")
    stop_sent = time.monotonic()
    stop = subprocess.Popen(
        [DOCKER, "stop", "-t", str(stop_timeout), container], stdout=subprocess.DEVNULL
    )
    time.sleep(1.0)  # let the signal land; the stream should still be running
    during_drain = try_generate(base)
    reader.join(stop_timeout + 30)
    stop.wait(stop_timeout + 30)
    stop_seconds = time.monotonic() - stop_sent
    exit_code = subprocess.run(
        [DOCKER, "inspect", "-f", "{{.State.ExitCode}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    if failure:
        raise CheckError(f"the stream broke during the drain: {failure[0]!r}")
    events = parse_stream([payload for _, payload in received])
    after_stop = sum(1 for when, payload in received if when > stop_sent and payload != "[DONE]")
    if after_stop < 2:
        raise CheckError(
            f"only {after_stop} events came after docker stop: the stream was not in flight;"
            " raise --max-new-tokens"
        )
    if during_drain.startswith("HTTP 2"):
        raise CheckError(f"a new request during the drain was served ({during_drain})")
    if len(events) != max_new_tokens:
        raise CheckError(f"asked for {max_new_tokens} tokens, the stream gave {len(events)}")
    if stop.returncode != 0 or exit_code != "0":
        raise CheckError(f"docker stop rc {stop.returncode}, container exit code {exit_code}")
    return (
        f"drain: {after_stop} of the stream's {len(events)} tokens and its [DONE] came after"
        f" docker stop; a new request during the drain got {during_drain};"
        f" exit code 0, {stop_seconds:.1f} s after the stop"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one check; exit 0 when it passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["ready", "generate", "stream", "metrics", "drain"])
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:18000")
    parser.add_argument("files", nargs="*", help="metrics: config files to scan for names")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--container")
    parser.add_argument("--max-new-tokens", type=int, default=600)
    parser.add_argument("--stop-timeout", type=int, default=60)
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")
    try:
        if args.check == "ready":
            line = wait_ready(base, args.timeout, args.container)
        elif args.check == "generate":
            line = check_generate(base)
        elif args.check == "stream":
            line = check_stream(base)
        elif args.check == "metrics":
            line = check_metrics(base, args.files)
        else:
            if not args.container:
                raise CheckError("drain needs --container")
            line = check_drain(base, args.container, args.max_new_tokens, args.stop_timeout)
    except (CheckError, OSError, ValueError) as exc:
        print(f"FAIL {args.check}: {exc}", file=sys.stderr)
        return 1
    print(f"ok   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
