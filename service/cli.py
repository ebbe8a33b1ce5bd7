"""The ``gptserve`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from service.version import package_version

# How long an idle OpenMP thread of torch's kernels spins before it sleeps, read by libgomp when
# torch loads, so set before any command imports torch. libgomp's default (300,000 spins, about a
# millisecond) keeps the compute threads burning both cores between steps, starving the HTTP
# thread and the clients: on 2 cores, 256 streams of a near-free model went from ~3,350 to ~3,750
# tokens/s with 10,000 (tens of microseconds). But then a gpt2 step's threads sleep and wake
# between its many small parallel regions: with 100,000, gpt2 served 42.8-42.9 tokens/s at one
# stream in float32 (39.5-40.8 with 10,000; the same 354 at 32 streams) and 107.8 / 803 at one /
# 32 streams in int8 (95.5 / 771), while the near-free model's 256 streams gave 3,541 (3,763).
# Models worth serving are gpt2-sized, so 100,000. GOMP_SPINCOUNT set in the environment wins.
OPENMP_SPIN_COUNT = "100000"
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

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
