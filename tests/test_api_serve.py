"""`gptserve serve`: settings from flags and environment, and SIGTERM draining in a real process."""

from __future__ import annotations

import argparse
import json
import os
import queue
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
import torch
from api_fixtures import make_engine, make_tiny_model, wait_until

from model.loading import save_checkpoint
from service.api import loader
from service.api.server import run_server
from service.api.settings import Settings
from service.commands import serve as serve_command

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    """The namespace `gptserve serve ...` parses to (only `serve` registered)."""
    parser = argparse.ArgumentParser(prog="gptserve")
    serve_command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_take_settings_from_env_with_flags_on_top(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("GPTSERVE_MAX_QUEUE", "9")
    monkeypatch.setenv("GPTSERVE_API_KEYS", "alpha, beta")
    monkeypatch.setenv("GPTSERVE_CORS_ORIGINS", "https://a.example")
    settings = serve_command.build_settings(parse("--max-batch-size", "3"))
    assert settings.max_batch_size == 3
    assert settings.max_queue == 9
    assert settings.api_keys == ["alpha", "beta"]
    assert settings.cors_origins == ["https://a.example"]
    flagged = serve_command.build_settings(
        parse("--api-key", "x", "--api-key", "y", "--no-warm-up")
    )
    assert flagged.api_keys == ["x", "y"]
    assert flagged.warm_up is False


def test_refuse_invalid_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_command.run(parse("--max-batch-size", "0", "--model", "unused")) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_fail_clearly_on_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.api.logging_config.configure_logging", lambda *args: None)
    assert serve_command.run(parse("--model", str(tmp_path / "nowhere"), "--port", "0")) == 1
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "nowhere" in err


def test_default_to_the_bundled_model_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "BUNDLED_MODEL_DIR", tmp_path / "bundled")
    with pytest.raises(loader.ServeConfigError, match="--model"):
        loader.resolve_model_spec(None)
    save_checkpoint(make_tiny_model(), tmp_path / "bundled")
    assert loader.resolve_model_spec(None) == str(tmp_path / "bundled")
    assert loader.resolve_model_spec("gpt2") == "gpt2"


def test_pick_device_and_dtype_automatically() -> None:
    cpu = torch.device("cpu")
    assert loader.resolve_dtype("auto", cpu) == torch.float32
    assert loader.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(loader.ServeConfigError):
        loader.resolve_dtype("float16", cpu)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loader.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(loader.ServeConfigError, match="CUDA"):
            loader.resolve_device("cuda")


def test_fast_decode_only_on_cuda(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(fast_decode=True, max_batch_size=8)
    assert loader.engine_config(settings, torch.device("cuda")).fast_decode is True
    with caplog.at_level("WARNING"):
        on_cpu = loader.engine_config(settings, torch.device("cpu"))
    assert on_cpu.fast_decode is False and on_cpu.max_batch_size == 8
    assert "captures CUDA graphs; on cpu it is off" in caplog.text


# ---------------------------------------------------------------- a real `gptserve serve`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "tiny-ckpt"
    save_checkpoint(make_tiny_model(), folder)
    return folder


class ServeProcess:
    """`python -m service.cli serve` on a free port, with its stdout read on a thread."""

    def __init__(self, checkpoint: Path, log_file: Path, *flags: str) -> None:
        command = [sys.executable, "-m", "service.cli", "serve", "--model", str(checkpoint)]
        command += ["--port", "0", "--max-batch-size", "2", *flags]
        self.log_file = log_file.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        stdout = self.process.stdout
        threading.Thread(
            target=lambda: [self.lines.put(line) for line in stdout], daemon=True
        ).start()
        self.url = self._wait_for_address(timeout=60)

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if "listening on http://" in line:
                return line.split("listening on ", 1)[1].split()[0]
        raise RuntimeError(f"gptserve serve did not start (exit code {self.process.poll()})")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log_file.close()


@pytest.fixture
def serve(checkpoint: Path, tmp_path: Path) -> Iterator[object]:
    started: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        started.append(ServeProcess(checkpoint, tmp_path / "serve.log", *flags))
        return started[-1]

    yield start
    for process in started:
        process.close()


def stream_in_background(
    url: str, body: dict
) -> tuple[list[str], threading.Event, threading.Thread]:
    """Read a whole /stream answer on a thread; the event is set at its first token."""
    lines: list[str] = []
    first_token = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{url}/stream", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first_token.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return lines, first_token, thread


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_drain_in_flight_requests_on_sigterm(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = serve("--drain-timeout", "60", "--served-model-name", "served", "--log-format", "json")
    assert wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=30)
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == ["served"]
    body = {"prompt": "x", "max_new_tokens": 1000, "ignore_eos": True}
    lines, first_token, reader = stream_in_background(server.url, body)
    assert first_token.wait(timeout=30)

    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, timeout=5)
    assert httpx.get(f"{server.url}/ready").json()["error"]["code"] == "draining"
    refused = httpx.post(f"{server.url}/generate", json={"prompt": "x"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert httpx.get(f"{server.url}/health").status_code == 200

    reader.join(timeout=60)
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2].removeprefix("data: "))
    assert final["finish_reason"] == "length"  # the in-flight stream ran to its end
    assert final["usage"]["completion_tokens"] == 1000
    assert server.process.wait(timeout=30) == 0
    log_lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    access = [entry for entry in log_lines if entry["logger"] == "gptserve.access"]
    streamed = [entry for entry in access if entry["path"] == "/stream"]
    assert streamed and streamed[0]["status"] == 200 and streamed[0]["completion_tokens"] == 1000
    assert all(entry["request_id"] for entry in access)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_abort_what_is_left_when_the_drain_times_out(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("--drain-timeout", "0.3")
    assert wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=30)
    body = {"prompt": "x", "max_new_tokens": 1000, "ignore_eos": True}
    lines, first_token, reader = stream_in_background(server.url, body)
    assert first_token.wait(timeout=30)
    server.process.send_signal(signal.SIGTERM)
    reader.join(timeout=60)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "aborted"
    assert len(lines) - 2 < 1000  # cut short, not run to the end
    assert server.process.wait(timeout=30) == 0


def test_fail_clearly_when_the_port_is_taken(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_server(Settings(port=port), make_engine(), "tiny") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
