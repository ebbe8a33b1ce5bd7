"""A training run's folder: checked before training, and its resumable `train_state.pt`.

`train_state.pt` holds what resuming needs to continue exactly: the current (not the best)
weights in float32, the optimizer, the step, the RNG states, the loss history and the config.
It holds only tensors and plain containers, so it is read with `weights_only=True`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CONFIG_FILE
from model.train_config import TrainConfig

TRAIN_STATE_FILE = "train_state.pt"


class TrainError(RuntimeError):
    """A training run that cannot start: an unusable output folder or resume state."""


def prepare_out_dir(path: Path, resume: bool) -> None:
    """Create the output folder and prove it writable, refusing to overwrite another run."""
    if path.exists() and not path.is_dir():
        raise TrainError(f"{path}: the output path exists and is not a folder")
    if resume and not (path / TRAIN_STATE_FILE).is_file():
        raise TrainError(f"{path}: no {TRAIN_STATE_FILE} to resume from")
    if not resume and any((path / name).exists() for name in (TRAIN_STATE_FILE, CONFIG_FILE)):
        raise TrainError(
            f"{path}: already holds a training run; pass --resume to continue it, or choose "
            "another --out-dir"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise TrainError(f"{path}: cannot write to the output folder ({err.strerror})") from None


def read_train_state(out_dir: str | Path) -> dict[str, Any]:
    """The saved state of the run in `out_dir`, checked to be readable."""
    path = Path(out_dir) / TRAIN_STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file; nothing to resume") from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise TrainError(f"{path}: not a readable training state ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise TrainError(f"{path}: not a gptserve training state")
    return state


def write_train_state(out_dir: Path, state: dict[str, Any]) -> None:
    """Write train_state.pt atomically: a crash never leaves a half-written one."""
    path = out_dir / TRAIN_STATE_FILE
    tmp = path.with_name(f".{TRAIN_STATE_FILE}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume_config(out_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config of the run in `out_dir`, with allowed `overrides` applied."""
    saved = TrainConfig.from_dict(read_train_state(out_dir)["config"])
    return saved.resumed_with({**overrides, "out_dir": str(out_dir)})


def check_resumable(saved: dict[str, Any], config: TrainConfig, data_sha256: str) -> None:
    """Raise unless `config` and the data file can continue the run saved as `saved`."""
    TrainConfig.from_dict(saved["config"]).resumed_with(config.to_dict())
    if saved.get("data_sha256") != data_sha256:
        raise TrainError(
            f"{config.data}: the data file changed since the run in {config.out_dir} started "
            "(its SHA-256 differs); resuming would train on different data"
        )
    if saved.get("iter", 0) >= config.max_iters:
        raise TrainError(
            f"{config.out_dir}: the run already finished its {saved.get('iter')} steps; "
            "raise max_iters to train further"
        )
