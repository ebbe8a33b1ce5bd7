"""The ``gptserve`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

from service.version import package_version

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
