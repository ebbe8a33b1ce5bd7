"""Settings of a training run (`gptserve train`), each checked when the config is built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from model.config import ConfigError, GPTConfig
from model.dtypes import DTYPES
from model.validation import DictFields, is_int, is_number

SAVE_DTYPES = tuple(DTYPES)  # float32, bfloat16, float16
# Settings a resumed run may change: they do not alter the model, the data or the optimizer's
# path up to the point of resuming (a moved data file is checked by its SHA-256 instead).
# Everything else must match the run being resumed.
RESUMABLE_OVERRIDES = frozenset(
    {
        "data",
        "out_dir",
        "max_iters",
        "eval_interval",
        "sample_tokens",
        "device",
        "num_threads",
        "save_dtype",
    }
)


class TrainConfigError(ValueError):
    """A training setting outside its valid range."""


@dataclass(frozen=True)
class TrainConfig(DictFields):
    """Everything that determines a training run; the same config and seed give the same losses."""

    unknown_keys_error = TrainConfigError
    unknown_keys_label = "unknown training settings"

    data: str  # a UTF-8 text file
    out_dir: str  # receives the best checkpoint (gptserve format) and train_state.pt
    # architecture
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.1
    # data
    val_fraction: float = 0.1  # the last tenth of the token stream validates
    batch_size: int = 8
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # optimizer and schedule
    max_iters: int = 2000  # optimizer steps
    learning_rate: float = 2e-3  # peak, reached at the end of warm-up
    min_lr: float = 2e-4  # reached at the last step
    warmup_iters: int = 100
    weight_decay: float = 0.1  # applied to 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # evaluation
    eval_interval: int = 200  # steps between validation runs (and saves)
    eval_batches: int = 8  # fixed batches per split averaged into each reported loss
    sample_tokens: int = 64  # length of the sample printed at each evaluation; 0 = none
    # run
    seed: int = 1337
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (cuda when available)
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    save_dtype: str = "float16"  # dtype of the saved model weights

    def __post_init__(self) -> None:
        for name in ("data", "out_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TrainConfigError(f"{name} must be a non-empty path")
        positive = (
            "n_layer n_head n_embd block_size batch_size grad_accum_steps max_iters "
            "eval_interval eval_batches"
        )
        for name in positive.split():
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_iters", "sample_tokens", "num_threads"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.warmup_iters >= self.max_iters:
            raise TrainConfigError(
                f"warmup_iters ({self.warmup_iters}) must be less than max_iters "
                f"({self.max_iters}); pass a smaller --warmup-iters"
            )
        _check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _check_number("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_number("learning_rate", self.learning_rate, 0.0, math.inf, low_open=True)
        _check_number("min_lr", self.min_lr, 0.0, self.learning_rate)
        _check_number("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_number("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check_number("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check_number("grad_clip", self.grad_clip, 0.0, math.inf)
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainConfigError(
                f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}"
            )
        device = self.device
        if not isinstance(device, str) or not (
            device in ("cpu", "cuda", "auto")
            or (device.startswith("cuda:") and device[5:].isdigit())
        ):
            raise TrainConfigError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
        try:
            self.model_config()
        except ConfigError as err:
            raise TrainConfigError(str(err)) from None

    def model_config(self) -> GPTConfig:
        """The architecture this run trains (GPT-2's vocabulary)."""
        return GPTConfig(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size
        )

    @property
    def tokens_per_iter(self) -> int:
        """Tokens that one optimizer step trains on."""
        return self.batch_size * self.grad_accum_steps * self.block_size

    def resumed_with(self, overrides: dict[str, Any]) -> TrainConfig:
        """This (saved) config with `overrides` applied, refusing changes that break resuming."""
        changed = sorted(
            name
            for name, value in overrides.items()
            if name not in RESUMABLE_OVERRIDES and getattr(self, name, value) != value
        )
        if changed:
            details = ", ".join(f"{n} {getattr(self, n)!r} -> {overrides[n]!r}" for n in changed)
            allowed = ", ".join(sorted(RESUMABLE_OVERRIDES))
            raise TrainConfigError(
                f"cannot change {details} when resuming; only {allowed} may change "
                "(start a new run in another folder instead)"
            )
        return TrainConfig.from_dict({**self.to_dict(), **overrides})


def _check_int(name: str, value: object, minimum: int) -> None:
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise TrainConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(
    name: str,
    value: object,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise unless `value` is a finite real number within the given (open or closed) bounds."""
    number = float(value) if is_number(value) else math.nan  # type: ignore[arg-type]
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise TrainConfigError(f"{name} must be a number in {interval}, got {value!r}")
