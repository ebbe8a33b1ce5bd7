"""The ``gptserve`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping

from service.version import package_version

# How long an idle OpenMP thread of torch's kernels spins before it sleeps, read by libgomp when
# torch loads, so set before any command imports torch. libgomp's default (300,000 spins, about a
# millisecond) keeps the compute threads burning both cores between steps, starving the HTTP
# thread and the clients: on 2 cores, 256 streams of a small model went from ~3,350 to ~3,750
# tokens/s with 10,000 (tens of microseconds), and gpt2's float32 steps, whose kernels come back
# to back, kept their speed (22.4 ms per token at one stream, 72 ms per step at 32). int8 steps
# are short and made of many small parallel regions, so their threads sleep and wake between
# regions at 10,000: gpt2 int8 served 95.5 tokens/s at one stream and 771 at 32 with 10,000,
# 107.8 and 803 with 100,000 (3,452 / 3,541 for the small model's 256 streams). So int8 serving
# spins 100,000. GOMP_SPINCOUNT set in the environment wins.
OPENMP_SPIN_COUNT = "10000"
INT8_OPENMP_SPIN_COUNT = "100000"


def openmp_spin_count(argv: list[str], environ: Mapping[str, str]) -> str:
    """The spin count for this command line: `INT8_OPENMP_SPIN_COUNT` when it serves int8
    weights (`--quantization int8`, or GPTSERVE_QUANTIZATION=int8 with no flag), else
    `OPENMP_SPIN_COUNT`. Read before argparse runs, so only these two spellings count."""
    quantization = environ.get("GPTSERVE_QUANTIZATION", "")
    for index, arg in enumerate(argv):
        if arg == "--quantization" and index + 1 < len(argv):
            quantization = argv[index + 1]
        elif arg.startswith("--quantization="):
            quantization = arg.split("=", 1)[1]
    return INT8_OPENMP_SPIN_COUNT if quantization == "int8" else OPENMP_SPIN_COUNT


os.environ.setdefault("GOMP_SPINCOUNT", openmp_spin_count(sys.argv[1:], os.environ))

# Each subcommand lives in service/commands/<name>.py with `register(subparsers)`, which adds
# its parser and sets `func` (args -> exit code). Modules import heavy dependencies lazily.
COMMANDS: list[str] = ["bench", "score", "serve", "train"]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser; each subcommand registers itself here."""
    parser = argparse.ArgumentParser(
        prog="gptserve",
        description="A batched text-generation service for GPT-2-class models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(f"service.commands.{module_name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gptserve`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
