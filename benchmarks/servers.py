"""Start and stop the servers a comparison runs: gptserve and the peers of benchmarks/peers/.

Each server runs alone, in its own process group, on the same port, with the same model files;
`running()` yields its base URL once it answers its readiness route and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("GPTSERVE_PEERS", Path.home() / ".cache" / "gptserve-peers"))
PORT = int(os.environ.get("GPTSERVE_BENCH_PORT", "8190"))
# llama.cpp's build folder under PEERS (build_llama.sh can make one without AMX, see its header)
LLAMA_BUILD = PEERS / os.environ.get("GPTSERVE_LLAMA_BUILD", "llama-build")


@dataclass(frozen=True)
class Server:
    """A server to measure: its kind (ours, vllm, llama) and what sets it apart."""

    name: str
    kind: str
    args: tuple[str, ...] = field(default=())
    gguf_type: str = "f32"  # llama.cpp's weights: f32 or q8_0

    def is_installed(self, model: str) -> bool:
        """Whether this machine has what the server needs."""
        if self.kind == "ours":
            return model == BUNDLED or (PEERS / model).is_dir()
        if self.kind == "vllm":
            return (PEERS / "vllm-venv" / "bin" / "python").is_file() and (PEERS / model).is_dir()
        return (LLAMA_BUILD / "bin" / "llama-server").is_file() and self.gguf(model).is_file()

    def gguf(self, model: str) -> Path:
        return PEERS / "gguf" / f"{model}-{self.gguf_type}.gguf"


BUNDLED = "bundled"  # the model that ships in the package, for workloads that need a trained one

KNOWN = {
    "ours": Server("ours", "ours"),
    "ours-int8": Server("ours-int8", "ours", ("--quantization", "int8")),
    "ours-highest": Server("ours-highest", "ours", ("--float32-matmul-precision", "highest")),
    "ours-kv-bf16": Server("ours-kv-bf16", "ours", ("--kv-cache-dtype", "bfloat16")),
    "ours-int8-kv-f32": Server(
        "ours-int8-kv-f32", "ours", ("--quantization", "int8", "--kv-cache-dtype", "float32")
    ),
    "ours-invariant": Server("ours-invariant", "ours", ("--batch-invariant",)),
    "ours-no-prefix": Server("ours-no-prefix", "ours", ("--no-prefix-caching",)),
    "ours-ngram": Server("ours-ngram", "ours", ("--speculative-method", "ngram")),
    "vllm": Server("vllm", "vllm"),
    "llama": Server("llama", "llama"),
    "llama-q8": Server("llama-q8", "llama", gguf_type="q8_0"),
}


def parse_servers(text: str, extra_ours_args: tuple[str, ...] = ()) -> list[Server]:
    """`ours,vllm,llama` -> servers (an unknown name is an error)."""
    servers = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name not in KNOWN:
            raise SystemExit(f"unknown server {name!r}; known: {', '.join(KNOWN)}")
        server = KNOWN[name]
        if server.kind == "ours" and extra_ours_args:
            server = Server(server.name, "ours", server.args + extra_ours_args)
        servers.append(server)
    return servers


def _command(server: Server, model: str, slots: int, max_model_len: int) -> tuple[list, dict]:
    env = dict(os.environ)
    cpus = os.cpu_count() or 1
    if server.kind == "ours":
        weights = [] if model == BUNDLED else ["--model", str(PEERS / model)]
        command = [
            sys.executable, "-m", "service.cli", "serve",
            *weights, "--served-model-name", model,
            "--port", str(PORT), "--max-batch-size", str(slots),
            "--max-queue", str(max(256, 4 * slots)),
            *server.args,
        ]  # fmt: skip
        return command, env
    if server.kind == "vllm":
        env |= {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cpus - 1}",
        }
        command = [
            str(PEERS / "vllm-venv" / "bin" / "python"),
            "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(PEERS / model), "--tokenizer", str(PEERS / model),
            "--served-model-name", model, "--host", "127.0.0.1", "--port", str(PORT),
            "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(slots), "--enable-prefix-caching",
            *server.args,
        ]  # fmt: skip
        return command, env
    command = [
        str(LLAMA_BUILD / "bin" / "llama-server"),
        "-m", str(server.gguf(model)), "-t", str(cpus),
        "-c", str(slots * max_model_len), "-np", str(slots), "-cb",
        "--host", "127.0.0.1", "--port", str(PORT), "-a", model, "--no-webui",
        *server.args,
    ]  # fmt: skip
    return command, env


@contextlib.contextmanager
def running(
    server: Server, model: str, slots: int, log_dir: Path, max_model_len: int = 1024
) -> Iterator[str]:
    """Run `server` on `model` until the block ends; yields its base URL once it is ready."""
    command, env = _command(server, model, slots, max_model_len)
    ready_path = "/ready" if server.kind == "ours" else "/health"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{server.name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{PORT}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{server.name} exited early; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + ready_path, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} not ready in 600 s; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
