"""The installed gptserve's version, for `--version`, the OpenAPI document and the logs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed gptserve's version (from its package metadata)."""
    try:
        return version("gptserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
