"""`gptserve serve`: load one model and serve it over HTTP (one process, one engine).

Every flag is a field of `Settings` (service/api/settings.py), which gives its type, default,
choices and help, and each is also the environment variable GPTSERVE_<NAME> (--max-batch-size is
GPTSERVE_MAX_BATCH_SIZE); a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from service.api.settings import Settings

if TYPE_CHECKING:
    import socket

ENV_PREFIX = "GPTSERVE_"
SCALAR_TYPES = (str, int, float)
DESCRIPTION = (
    "Load one model and serve it over HTTP. Every flag is also an environment variable, "
    "GPTSERVE_ + its name in capitals (--max-batch-size is GPTSERVE_MAX_BATCH_SIZE); a flag given "
    "on the command line wins. The first SIGTERM or Ctrl-C drains (in-flight requests finish, up "
    "to --drain-timeout), a second one exits at once."
)


def flag_name(field_name: str) -> str:
    """The flag of a settings field: max_batch_size -> --max-batch-size."""
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    """The environment variable of a settings field: max_batch_size -> GPTSERVE_MAX_BATCH_SIZE."""
    return ENV_PREFIX + field_name.upper()


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _shown_default(field: FieldInfo) -> str:
    """The default as the help shows it (`on`/`off` for switches)."""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _help(name: str, field: FieldInfo, env_value: str) -> str:
    """The field's description, its default (unless the description names it) and its variable."""
    text = field.description or name.replace("_", " ")
    if "(default:" not in text:
        text += f" (default: {_shown_default(field)})"
    text += f" [env {env_name(name)}{env_value}]"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, typed, with choices and help taken from the field.

    Booleans get --x / --no-x; a list field (api_keys) gets a repeatable flag named for one item
    (--api-key). Flags not given stay absent from the namespace (the parser's default must be
    SUPPRESS), so the environment's value stands.
    """
    for name, field in Settings.model_fields.items():
        annotation = _without_none(field.annotation)
        origin = get_origin(annotation)
        options: dict[str, Any] = {"dest": name}
        flag = flag_name(name)
        env_value = ""
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = get_args(annotation)
            options.update(type=type(choices[0]), choices=choices)
        elif origin is list and get_args(annotation)[0] in SCALAR_TYPES:
            singular = name.removesuffix("s")
            flag = flag_name(singular)
            options.update(
                action="append",
                type=get_args(annotation)[0],
                metavar=singular.rsplit("_", 1)[-1].upper(),
            )
            env_value = "=a,b"
        elif annotation in SCALAR_TYPES:
            is_text = annotation is str
            options.update(
                type=annotation, metavar=name.rsplit("_", 1)[-1].upper() if is_text else "N"
            )
        else:
            raise TypeError(
                f"Settings.{name}: no command-line flag for a field of type {field.annotation}; "
                "use bool, str, int, float, a Literal of them, a list of them, or X | None"
            )
        parser.add_argument(flag, help=_help(name, field, env_value), **options)


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP",
        description=DESCRIPTION,
        argument_default=argparse.SUPPRESS,  # unset flags leave the environment's value alone
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    overrides = {key: value for key, value in vars(args).items() if key in Settings.model_fields}
    return Settings(**overrides)


def report_error(message: str, log_format: str) -> None:
    """Say why serving stopped: `gptserve serve: ...` on stderr, or one JSON line in json mode."""
    if log_format == "json":
        from service.api.logging_config import JsonFormatter

        record = logging.makeLogRecord(
            {
                "name": "gptserve.serve",
                "levelno": logging.ERROR,
                "levelname": "ERROR",
                "msg": message,
            }
        )
        print(JsonFormatter().format(record), file=sys.stderr, flush=True)
    else:
        print(f"gptserve serve: {message}", file=sys.stderr, flush=True)


def _requested_log_format(args: argparse.Namespace) -> str:
    """The log format asked for, read before the settings are known to be valid."""
    given = getattr(args, "log_format", None) or os.environ.get(env_name("log_format"), "")
    return "json" if given.strip().lower() == "json" else "text"


def run(args: argparse.Namespace) -> int:
    """Build the settings (flags over environment), claim the port, load the model, serve."""
    from pydantic import ValidationError

    try:
        settings = build_settings(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()
        )
        report_error(f"invalid settings: {problems}", _requested_log_format(args))
        return 2

    from service.api.logging_config import configure_logging
    from service.api.server import bind_socket

    configure_logging(settings.log_level, settings.log_format)
    # The port first: a taken port is reported at once, not after loading the model.
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        report_error(
            f"cannot listen on {settings.host}:{settings.port}: {exc}", settings.log_format
        )
        return 1
    try:
        return _load_and_serve(settings, sock)
    finally:
        sock.close()


def _load_and_serve(settings: Settings, sock: socket.socket) -> int:
    from service.api.loader import load_engine
    from service.api.server import run_server

    try:
        engine, name = load_engine(settings)
    except (ValueError, OSError, RuntimeError) as exc:  # bad spec, missing files, no CUDA ...
        report_error(f"cannot load the model: {exc}", settings.log_format)
        return 1
    except KeyboardInterrupt:
        report_error("interrupted while loading the model", settings.log_format)
        return 130
    return run_server(settings, engine, name, sock=sock)
