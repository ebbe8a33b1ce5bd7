"""The repository explains itself: no paths of a development machine, the bundled model's corpus
and training command in the repo and in agreement, and the container files in step."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from model.train_config import TrainConfig
from service.api.settings import Settings
from service.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "tinyshakespeare.txt"
BUNDLED_CONFIG = REPO / "model" / "assets" / "bundled" / "gptserve.json"
BUNDLED_DOC = REPO / "docs" / "bundled-model.md"
# Absolute paths that only exist on someone's machine, and folders beside the repository.
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])/(?:work|root|Users|tmp|mnt|scratch|srv)/[\w.-]"
    r"|(?<![\w.~-])/home/(?!gptserve\b)[\w.-]+"
    r"|(?<![\w.])\.\./(?:shared|notes)\b"
    r"|(?<![\w./-])shared/(?:data|notes|peers)\b"
)
# Compose-level variables (image, build, host port), not settings of the server.
COMPOSE_ONLY = {"GPTSERVE_IMAGE", "GPTSERVE_BASE_IMAGE", "GPTSERVE_BUILD_OFFLINE"}
COMPOSE_ONLY |= {"GPTSERVE_HOST_PORT"}
FIXED_IN_IMAGE = {"host", "port"}  # the image sets these; compose publishes the port instead


def repo_files() -> list[Path]:
    """Tracked files, and new ones git does not ignore."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def test_name_no_path_of_a_development_machine() -> None:
    offenders = []
    for path in repo_files():
        if path == Path(__file__).resolve():
            continue
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:  # binary: weights
            continue
        for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            for match in MACHINE_PATH.finditer(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}")
    assert not offenders, "machine-specific paths:\n" + "\n".join(offenders)


def test_keep_the_corpus_with_its_hash() -> None:
    digest = hashlib.sha256(CORPUS.read_bytes()).hexdigest()
    (line,) = (REPO / "data" / "SHA256SUMS").read_text().splitlines()
    assert line == f"{digest}  tinyshakespeare.txt"
    assert digest in (REPO / "data" / "README.md").read_text()
    assert digest in BUNDLED_DOC.read_text()
    training = json.loads(BUNDLED_CONFIG.read_text())["metadata"]["training"]
    assert training["data"]["sha256"] == digest


def documented_command() -> str:
    """The `gptserve train ...` line of docs/bundled-model.md."""
    (line,) = [
        line for line in BUNDLED_DOC.read_text().splitlines() if line.startswith("gptserve train ")
    ]
    return line


def test_document_the_command_that_reproduces_the_bundled_model() -> None:
    command = documented_command()
    training = json.loads(BUNDLED_CONFIG.read_text())["metadata"]["training"]
    assert training["command"] == command
    args = build_parser().parse_args(shlex.split(command)[1:])
    given = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if name in args}
    assert TrainConfig(**given).to_dict() == training["config"]
    assert (REPO / given["data"]).resolve() == CORPUS  # a path inside the repository


def test_make_bundled_model_runs_the_documented_command() -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry_run = subprocess.run(
        ["make", "-n", "-s", "bundled-model", "VENV=venv-for-dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (train_line,) = [line for line in dry_run.splitlines() if "/gptserve train " in line]
    assert train_line.strip().replace("venv-for-dry-run/bin/", "") == documented_command()
    assert (
        "cp runs/bundled/gptserve.json runs/bundled/model.safetensors model/assets/bundled/"
        in dry_run
    )


def test_show_one_docker_run_line_in_the_dockerfile_and_the_readmes() -> None:
    header = (REPO / "Dockerfile").read_text()
    (line,) = re.findall(r"^#\s+(docker run --gpus all [^\n`]*gptserve)\s*$", header, re.M)
    assert line == "docker run --gpus all -p 127.0.0.1:8000:8000 gptserve"
    for readme in ("README.md", "docker/README.md"):
        assert line in (REPO / readme).read_text(), readme


def test_pass_every_setting_through_compose() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    environment: dict[str, str] = compose["x-server"]["environment"]
    expected = {f"GPTSERVE_{name.upper()}" for name in Settings.model_fields} - {
        f"GPTSERVE_{name.upper()}" for name in FIXED_IN_IMAGE
    }
    missing = sorted(expected - set(environment))
    assert not missing, f"add to x-server.environment in docker/compose.yaml: {missing}"
    unknown = sorted(set(environment) - expected - COMPOSE_ONLY)
    assert not unknown, f"not settings of gptserve serve: {unknown}"
    for name, value in environment.items():
        assert re.fullmatch(rf"\$\{{{name}:-[^}}]*\}}", str(value)), f"{name}: {value}"


def test_use_the_current_licence_fields() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)  # an SPDX expression
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
