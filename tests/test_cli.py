"""The `gptserve` command line: --version, and `serve` flags built from the Settings model."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Literal, get_args

import pytest
from pydantic import Field

from service.api.settings import Settings
from service.cli import OPENMP_SPIN_COUNT, build_parser, main, package_version
from service.commands import serve as serve_command


def serve_parser() -> argparse.ArgumentParser:
    """The `serve` subparser, as `gptserve serve` builds it."""
    parser = argparse.ArgumentParser(prog="gptserve")
    subparsers = parser.add_subparsers(dest="command")
    serve_command.register(subparsers)
    return subparsers.choices["serve"]


def flag_of(name: str) -> str:
    """The flag a field gets: list fields are named for one item (api_keys -> --api-key)."""
    field = Settings.model_fields[name]
    singular = (
        name.removesuffix("s") if getattr(field.annotation, "__origin__", None) is list else name
    )
    return "--" + singular.replace("_", "-")


def help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    """The help text of one flag, as `--help` prints it (whitespace collapsed)."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if flag in action.option_strings:
            return " ".join(formatter._expand_help(action).split())
    raise AssertionError(f"no flag {flag}")


def test_print_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gptserve {package_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", package_version())


def test_give_every_setting_a_flag_with_its_default_in_the_help() -> None:
    parser = serve_parser()
    for name, field in Settings.model_fields.items():
        text = help_of(parser, flag_of(name))
        env = f"GPTSERVE_{name.upper()}"
        assert env in text, f"--help of {flag_of(name)} does not name {env}"
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            assert f"(default: {'on' if default else 'off'})" in text
        elif default in (None, []):
            assert "(default: " in text, f"--help of {flag_of(name)} does not say its default"
        else:
            assert f"(default: {default})" in text


def test_take_choices_from_the_literal_types() -> None:
    parser = serve_parser()
    for name in ("device", "dtype", "quantization", "log_format", "log_level"):
        (action,) = [a for a in parser._actions if flag_of(name) in a.option_strings]
        assert tuple(action.choices or ()) == get_args(Settings.model_fields[name].annotation)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int4"])


def test_map_flags_onto_settings_with_env_underneath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTSERVE_MAX_QUEUE", "9")
    monkeypatch.setenv("GPTSERVE_MODEL", "")  # empty counts as unset
    parser = serve_parser()
    args = parser.parse_args(
        ["--no-pack-weights", "--cors-origin", "https://a", "--cors-origin", "https://b"]
        + ["--drain-timeout", "2.5", "--max-model-len", "64", "--quantization", "int8"]
    )
    settings = serve_command.build_settings(args)
    assert settings.pack_weights is False
    assert settings.cors_origins == ["https://a", "https://b"]
    assert settings.drain_timeout == 2.5 and settings.max_model_len == 64
    assert settings.quantization == "int8"
    assert settings.max_queue == 9  # from the environment: the flag was not given
    assert settings.model is None


def test_turn_a_new_settings_field_into_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    class NewSettings(Settings):
        spin_mode: Literal["slow", "fast"] = Field(default="slow", description="how to spin")
        max_spins: int | None = Field(default=None, description="spins (default: unlimited)")
        greetings: list[str] = Field(default_factory=list, description="hellos, repeatable")

    monkeypatch.setattr(serve_command, "Settings", NewSettings)
    parser = serve_parser()
    assert "how to spin (default: slow) [env GPTSERVE_SPIN_MODE]" in help_of(parser, "--spin-mode")
    assert "(default: unlimited)" in help_of(parser, "--max-spins")
    args = parser.parse_args(["--spin-mode", "fast", "--greeting", "hi", "--greeting", "yo"])
    assert {**vars(args), "func": None} == {
        "spin_mode": "fast",
        "greetings": ["hi", "yo"],
        "func": None,
    }


def test_refuse_a_field_type_with_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    class OddSettings(Settings):
        weights: dict[str, float] = Field(default_factory=dict)

    monkeypatch.setattr(serve_command, "Settings", OddSettings)
    with pytest.raises(TypeError, match="Settings.weights"):
        serve_parser()


def test_list_serve_and_train_in_the_top_level_help() -> None:
    text = build_parser().format_help()
    assert "--version" in text
    assert "serve" in text and "train" in text


def test_the_spin_count_reaches_libgomp_before_torch_loads() -> None:
    """A fresh interpreter that loads the CLI sets GOMP_SPINCOUNT before torch is imported
    (libgomp reads it once, when torch loads), and one set in the environment wins."""
    code = (
        "import os, sys, service.cli; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    )
    for env, expected in (({}, f"{OPENMP_SPIN_COUNT} False"), ({"GOMP_SPINCOUNT": "7"}, "7 False")):
        environ = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | env
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=environ,
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == expected
