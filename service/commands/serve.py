"""`gptserve serve`: load one model and serve it over HTTP (one process, one engine).

Every flag has a `GPTSERVE_<NAME>` environment variable; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.api.settings import Settings

BOOLEAN = argparse.BooleanOptionalAction


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP",
        description=__doc__,
        argument_default=argparse.SUPPRESS,  # unset flags leave the environment's value alone
    )
    add = parser.add_argument
    add("--model", help="model folder, checkpoint file or Hub name (default: the bundled model)")
    add("--served-model-name", help="name in /v1/models and responses")
    add("--host", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, help="port to listen on; 0 picks a free one (default 8000)")
    add("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    add("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default auto")
    add(
        "--quantization",
        choices=["none", "int8"],
        help="int8: int8 weights for the linear layers (CPU, float32 only; 2-4x faster decoding, "
        "logits no longer bit-exact); default none",
    )
    add(
        "--pack-weights",
        action=BOOLEAN,
        help="CPU (float32, unquantized): keep a oneDNN-packed copy of the linear "
        "weights for steps of 4+ rows; ~1.7x faster decoding at 4-16 concurrent, costs a second "
        "copy of the weights (default on)",
    )
    add(
        "--fast-decode",
        action=BOOLEAN,
        help="capture the decode step as CUDA graphs at bucketed batch sizes and replay them "
        "(CUDA only, ignored on CPU; eager if capturing fails; default off)",
    )
    add("--max-batch-size", type=int, help="requests decoding together (default 32)")
    add("--max-queue", type=int, help="requests waiting before 429 (default 256)")
    add("--max-prefill-tokens", type=int, help="prompt tokens per engine step (default 512)")
    add("--max-model-len", type=int, help="context window (default: the model's)")
    add("--truncate-prompt", action=BOOLEAN, help="left-truncate over-long prompts")
    add("--warm-up", action=BOOLEAN, help="warm up before reporting ready (default on)")
    add(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help="accepted bearer key, repeatable; env GPTSERVE_API_KEYS=a,b (default: no auth)",
    )
    add(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="allowed CORS origin, repeatable; env GPTSERVE_CORS_ORIGINS=a,b (default: none)",
    )
    add("--max-body-bytes", type=int, help="largest request body (default 1048576)")
    add("--drain-timeout", type=float, help="seconds to finish requests after SIGTERM (default 30)")
    add("--keepalive-interval", type=float, help="seconds between SSE keep-alives (default 15)")
    add("--retry-after", type=int, help="Retry-After seconds on 429 (default 1)")
    add("--log-format", choices=["text", "json"], help="default text")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    parser.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    from service.api.settings import Settings

    overrides = {key: value for key, value in vars(args).items() if key not in ("command", "func")}
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    """Build the settings (flags over environment), load the model, serve until SIGTERM."""
    from pydantic import ValidationError

    try:
        settings = build_settings(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()
        )
        print(f"gptserve serve: invalid settings: {problems}", file=sys.stderr)
        return 2

    from service.api.loader import load_engine
    from service.api.logging_config import configure_logging
    from service.api.server import run_server

    configure_logging(settings.log_level, settings.log_format)
    try:
        engine, name = load_engine(settings)
    except (ValueError, OSError, RuntimeError) as exc:  # bad spec, missing files, no CUDA ...
        print(f"gptserve serve: cannot load the model: {exc}", file=sys.stderr)
        return 1
    return run_server(settings, engine, name)
