"""Start-up and shutdown of `gptserve serve`: the summary line, the port checked before loading,
HEAD probes, quiet probe logs, JSON logs everywhere, and a clean forced exit on a second signal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_fixtures import live_server, make_engine, make_tiny_model, wait_until
from fastapi.testclient import TestClient

from model.loading import save_checkpoint
from model.packed_linear import pack_linears, packing_available
from model.quantize import apply_quantization
from model.tokenizer import Tokenizer
from service.api import loader
from service.api.app import create_app
from service.api.settings import Settings
from service.api.startup_summary import (
    StartupSummary,
    format_count,
    serves_page,
    startup_summary,
)
from service.commands import serve as serve_command
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gptserve")
    serve_command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def summary_of(engine: AsyncEngine, **settings: object) -> StartupSummary:
    """The start-up summary of an app over `engine`, as if it listened on 127.0.0.1:8123."""
    app = create_app(Settings(warm_up=False, **settings), engine, "tiny")  # type: ignore[arg-type]
    with TestClient(app):
        return startup_summary(app, "127.0.0.1", 8123)


def test_summarise_model_size_and_limits_in_one_line() -> None:
    summary = summary_of(make_engine(max_batch_size=3, max_queue_size=7), model="runs/gone")
    assert summary.url == "http://127.0.0.1:8123"
    assert summary.docs_url == "http://127.0.0.1:8123/docs"
    if summary.playground_url:  # the app serves a page at /
        assert summary.playground_url == "http://127.0.0.1:8123/"
        assert "(playground at http://127.0.0.1:8123/, docs at" in summary.message()
    assert (summary.model, summary.model_source, summary.model_path) == ("tiny", "hub", "runs/gone")
    assert summary.num_parameters == make_tiny_model().config.num_parameters
    assert (summary.device, summary.dtype, summary.quantization) == ("cpu", "float32", "none")
    assert summary.packed_weights is False
    assert summary.num_threads >= 1
    assert (summary.context_window, summary.batch_slots, summary.max_queue) == (1024, 3, 7)
    # 2 (keys, values) x 2 layers x 3 slots x 32 wide x 1024 positions x 4 bytes
    assert summary.kv_cache_bytes == 2 * 2 * 3 * 32 * 1024 * 4
    line = summary.message()
    assert "\n" not in line
    assert line.startswith("listening on http://127.0.0.1:8123 (")
    assert "docs at http://127.0.0.1:8123/docs); " in line
    for part in (
        "model tiny (hub runs/gone, 1.67M parameters)",
        "cpu float32",
        "quantization none",
    ):
        assert part in line
    assert summary.speculation == "off" and "speculative decoding off, " in line
    for part in ("packed weights off", "threads", "context 1024 tokens", "3 batch slots"):
        assert part in line
    assert "KV cache 1.5 MiB, queue 7" in line  # no dtype named: the model's
    assert summary.kv_cache_dtype == "float32"
    assert json.loads(json.dumps(summary.fields()))["kv_cache_bytes"] == summary.kv_cache_bytes


def test_summary_names_a_kv_cache_dtype_other_than_the_models() -> None:
    engine = LLMEngine(
        make_tiny_model(),
        Tokenizer.default(),
        EngineConfig(max_batch_size=3, max_queue_size=7, kv_cache_dtype="bfloat16"),
    )
    summary = summary_of(AsyncEngine(engine))
    assert summary.kv_cache_dtype == "bfloat16"
    assert "KV cache 0.8 MiB bfloat16, queue 7" in summary.message()  # half of 1.5 MiB
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "fp8")
    assert parse("--kv-cache-dtype", "float16").kv_cache_dtype == "float16"


def test_summary_says_how_it_speculates() -> None:
    config = EngineConfig(max_batch_size=3, speculative_method="ngram")
    summary = summary_of(AsyncEngine(LLMEngine(make_tiny_model(), Tokenizer.default(), config)))
    phrase = "prompt lookup, up to 8 guesses, in steps of at most 4 requests"  # CPU defaults
    assert summary.speculation == phrase
    assert f"speculative decoding {phrase}, " in summary.message()
    config = EngineConfig(
        max_batch_size=3,
        speculative_method="draft",
        num_speculative_tokens=5,
        speculative_max_batch_size=2,
    )
    engine = LLMEngine(
        make_tiny_model(), Tokenizer.default(), config, draft_model=make_tiny_model()
    )
    summary = summary_of(AsyncEngine(engine))
    assert summary.speculation == "draft model, up to 5 guesses, in steps of at most 2 requests"


def test_summary_says_int8_and_packed_weights() -> None:
    config = EngineConfig(max_batch_size=2)
    int8 = apply_quantization(make_tiny_model(), "int8")
    summary = summary_of(AsyncEngine(LLMEngine(int8, Tokenizer.default(), config)))
    assert summary.quantization == "int8" and "quantization int8" in summary.message()
    assert summary.model_source == "bundled" and "(the bundled model," in summary.message()
    if packing_available():
        packed = make_tiny_model()
        pack_linears(packed)
        summary = summary_of(AsyncEngine(LLMEngine(packed, Tokenizer.default(), config)))
        assert summary.packed_weights is True and "packed weights on" in summary.message()


def test_name_the_playground_when_the_app_serves_a_page_at_the_root() -> None:
    app = create_app(Settings(warm_up=False), make_engine(), "tiny")
    if not serves_page(app, "/"):
        app.add_api_route("/", lambda: {"page": "playground"}, include_in_schema=False)
    with TestClient(app):
        summary = startup_summary(app, "127.0.0.1", 8123)
    assert summary.playground_url == "http://127.0.0.1:8123/"
    pages = "(playground at http://127.0.0.1:8123/, docs at http://127.0.0.1:8123/docs)"
    assert pages in summary.message()
    assert not serves_page(app, "/no-such-page")


def test_format_parameter_counts() -> None:
    assert [format_count(n) for n in (999, 7_259_008, 124_439_808, 1_557_611_200)] == [
        "999",
        "7.26M",
        "124.44M",
        "1.56B",
    ]


def test_check_the_port_before_loading_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loads: list[object] = []
    monkeypatch.setattr(loader, "load_engine", lambda settings: loads.append(settings))
    monkeypatch.setattr("service.api.logging_config.configure_logging", lambda *args: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert serve_command.run(parse("--port", str(port), "--model", "unused")) == 1
    assert time.monotonic() - started < 5
    assert loads == []  # refused before any loading
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_report_invalid_settings_as_json_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_command.run(parse("--log-format", "json", "--max-batch-size", "0")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and "max_batch_size" in entry["message"]


def test_answer_head_probes_like_get_without_a_body() -> None:
    with live_server() as server:
        for path in ("/health", "/ready"):
            got = httpx.get(server.url + path)
            head = httpx.head(server.url + path)
            assert head.status_code == got.status_code == 200
            assert head.content == b""
            assert head.headers["content-length"] == got.headers["content-length"]
            assert head.headers["content-type"] == "application/json"


def test_log_probe_requests_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with live_server() as server, caplog.at_level(logging.DEBUG, logger="gptserve.access"):
        for path in ("/ready", "/health", "/metrics"):
            httpx.get(server.url + path)
        httpx.post(server.url + "/tokenize", json={"prompt": "x"})
        assert wait_until(lambda: len(_access(caplog)) == 4, timeout=5)
    levels = {record.path: record.levelno for record in _access(caplog)}  # type: ignore[attr-defined]
    assert levels == {
        "/ready": logging.DEBUG,
        "/health": logging.DEBUG,
        "/metrics": logging.DEBUG,
        "/tokenize": logging.INFO,
    }


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "gptserve.access"]


# ---------------------------------------------------------------- a real `gptserve serve`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("startup") / "tiny-ckpt"
    save_checkpoint(make_tiny_model(), folder)
    return folder


class Served:
    """`python -m service.cli serve` with stdout and stderr collected on threads."""

    def __init__(self, checkpoint: Path, *flags: str) -> None:
        command = [sys.executable, "-m", "service.cli", "serve", "--model", str(checkpoint)]
        command += ["--port", "0", "--max-batch-size", "2", "--no-warm-up", *flags]
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for pipe, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=lambda p=pipe, out=lines: out.extend(p), daemon=True).start()
        if not wait_until(lambda: bool(self.stdout) or self.process.poll() is not None, 60):
            raise RuntimeError("gptserve serve printed nothing within 60 s")
        if not self.stdout:
            raise RuntimeError(f"gptserve serve exited: {''.join(self.stderr)}")
        self.url = self.stdout[0].split("listening on ", 1)[1].split()[0]
        assert wait_until(lambda: httpx.get(self.url + "/ready").status_code == 200, 30)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout=timeout)
        time.sleep(0.2)  # let the reader threads take the last lines
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def serve(checkpoint: Path) -> Iterator[object]:
    started: list[Served] = []

    def start(*flags: str) -> Served:
        started.append(Served(checkpoint, *flags))
        return started[-1]

    yield start
    for served in started:
        served.close()


def stream_in_background(url: str) -> tuple[list[str], threading.Thread]:
    lines: list[str] = []
    body = {"prompt": "x", "max_new_tokens": 1000, "ignore_eos": True}

    def read() -> None:
        with httpx.stream("POST", f"{url}/stream", json=body, timeout=60) as response:
            lines.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return lines, thread


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_print_the_summary_line_on_stdout(serve, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    served = serve("--log-level", "warning")  # the summary shows at every level
    (line,) = served.stdout
    assert line.startswith(f"gptserve: listening on {served.url} (")
    assert f"docs at {served.url}/docs); " in line
    assert f"model tiny-ckpt (folder {checkpoint}, 1.67M parameters)" in line
    assert "2 batch slots" in line and "context 1024 tokens" in line
    served.process.send_signal(signal.SIGTERM)
    assert served.wait() == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_log_only_json_and_exit_at_once_on_a_second_signal(serve) -> None:  # type: ignore[no-untyped-def]
    served = serve("--log-format", "json", "--drain-timeout", "60")
    summary = json.loads(served.stdout[0])
    assert summary["logger"] == "gptserve.startup" and summary["url"] == served.url
    assert summary["model"] == "tiny-ckpt" and summary["model_source"] == "folder"
    assert summary["quantization"] == "none" and summary["batch_slots"] == 2
    lines, reader = stream_in_background(served.url)
    assert wait_until(lambda: len(lines) >= 2, timeout=30)

    served.process.send_signal(signal.SIGINT)  # drains: the stream would run to its end
    assert wait_until(lambda: httpx.get(f"{served.url}/ready").status_code == 503, timeout=5)
    served.process.send_signal(signal.SIGINT)  # exits now
    reader.join(timeout=30)
    assert served.wait() == 128 + signal.SIGINT
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "aborted"
    assert len(lines) < 1000

    entries = [json.loads(line) for line in served.stdout + served.stderr]  # every line is JSON
    forced = [entry for entry in entries if "exiting now" in entry["message"]]
    assert len(forced) == 1 and forced[0]["level"] == "warning"
    assert not any("Traceback" in json.dumps(entry) for entry in entries)
