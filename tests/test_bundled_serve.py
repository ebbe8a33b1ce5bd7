"""`gptserve serve` with no --model serves the committed bundled model, as `make serve` does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_serve_bundled_model_streamed_and_not(tmp_path: Path) -> None:
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        url = ""
        for line in process.stdout:  # the first lines say where it listens
            if "listening on http://" in line:
                url = line.split("listening on ", 1)[1].split()[0]
                break
        assert url, "the server did not say where it listens"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.2)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        (model,) = [m.id for m in client.models.list().data]
        assert model == "gpt2-tiny-shakespeare"
        completion = client.completions.create(
            model=model, prompt="ROMEO:", max_tokens=20, temperature=0, seed=1
        )
        text = completion.choices[0].text
        assert completion.usage is not None and completion.usage.completion_tokens >= 1
        pieces = [
            chunk.choices[0].text
            for chunk in client.completions.create(
                model=model, prompt="ROMEO:", max_tokens=20, temperature=0, stream=True
            )
            if chunk.choices
        ]
        # Greedy, so the stream spells out the same text, and a trained model writes words.
        assert "".join(pieces) == text
        assert sum(ch.isalpha() for ch in text) > len(text) // 3
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
        log.close()
    assert exit_code == 0
