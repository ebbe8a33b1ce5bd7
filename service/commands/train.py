"""`gptserve train`: train a GPT-2-architecture model on a text file (see model/train.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import MISSING, fields
from typing import Any

from model.train_config import SAVE_DTYPES, TrainConfig

# One line of help per TrainConfig field; every field gets a flag (n_layer -> --n-layer).
FIELD_HELP: dict[str, str] = {
    "data": "UTF-8 text file to train on (required unless --resume)",
    "out_dir": "folder for the best checkpoint (gptserve format) and train_state.pt (required)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "embedding width (must divide by --n-head)",
    "block_size": "context length in tokens",
    "dropout": "dropout probability while training",
    "val_fraction": "share of the token stream, taken from its end, that validates",
    "batch_size": "sequences per micro-batch",
    "grad_accum_steps": "micro-batches per optimizer step",
    "max_iters": "optimizer steps",
    "learning_rate": "peak learning rate, reached at the end of warm-up",
    "min_lr": "learning rate at the last step (cosine decay)",
    "warmup_iters": "steps of linear learning-rate warm-up; when not given and --max-iters is "
    "not above it, a tenth of --max-iters",
    "weight_decay": "AdamW weight decay, on 2-D weights only",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this; 0 disables",
    "eval_interval": "steps between evaluations, samples and saves",
    "eval_batches": "fixed batches per split averaged into each evaluation",
    "sample_tokens": "tokens of the sample printed at each evaluation; 0 disables",
    "seed": "seed for initialisation, batches and dropout",
    "device": "cpu, cuda, cuda:N or auto (cuda with bf16 autocast when available)",
    "num_threads": "CPU threads for torch; 0 keeps torch's default",
    "save_dtype": f"dtype of the saved weights: {', '.join(SAVE_DTYPES)}",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(name: str) -> Any:
    return next(spec.default for spec in fields(TrainConfig) if spec.name == name)


DEFAULT_WARMUP_ITERS: int = _default("warmup_iters")
SCALED_WARMUP_SHARE = 10  # a short run warms up for a tenth of its steps


def scale_warmup(given: dict[str, Any]) -> str | None:
    """For a run shorter than the default warm-up, warm up for a tenth of it instead.

    Only when --warmup-iters was not given; returns a note saying so, or None.
    """
    max_iters = given.get("max_iters")
    if "warmup_iters" in given or not isinstance(max_iters, int):
        return None
    if max_iters > DEFAULT_WARMUP_ITERS:
        return None
    given["warmup_iters"] = max_iters // SCALED_WARMUP_SHARE
    return (
        f"--max-iters {max_iters} is not above the default warm-up of {DEFAULT_WARMUP_ITERS} "
        f"steps, so warming up for {given['warmup_iters']} (pass --warmup-iters to choose)"
    )


def register(subparsers: Any) -> None:
    """Add the `train` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train a model on a text file",
        description=(
            "Train a GPT-2-architecture model on a plain text file (GPT-2 BPE tokens; the last "
            "--val-fraction of the token stream validates) with AdamW, warm-up and cosine decay. "
            "The best-validation weights are saved to --out-dir in gptserve's format, which "
            "`gptserve serve --model` loads; --resume continues an interrupted run exactly."
        ),
        # Flags not given stay absent, so --resume can tell them from the saved run's values.
        argument_default=argparse.SUPPRESS,
    )
    for spec in fields(TrainConfig):
        default = None if spec.default is MISSING else spec.default
        kind = type(default) if default is not None else str
        shown = f" (default: {default})" if default is not None else ""
        choices = SAVE_DTYPES if spec.name == "save_dtype" else None
        parser.add_argument(
            _flag(spec.name),
            type=kind,
            choices=choices,
            metavar=spec.name.upper(),
            help=FIELD_HELP[spec.name] + shown,
        )
    parser.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run saved in --out-dir; flags given override its settings where allowed",
    )
    parser.add_argument(
        "--no-progress", action="store_true", default=False, help="hide the progress bar"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train with the given flags; returns the exit code."""
    # Imported here: torch is slow to import and other subcommands do not need it.
    from model.config import ConfigError
    from model.data import DataError
    from model.train import TrainError, resume_config, train
    from model.train_config import TrainConfigError

    names = [spec.name for spec in fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    command = ["gptserve", "train"]
    for name, value in given.items():
        command += [_flag(name), str(value)]
    command += ["--resume"] if args.resume else []
    try:
        if "out_dir" not in given:
            raise TrainConfigError("--out-dir is required")
        if args.resume:
            config = resume_config(given["out_dir"], given)
        elif "data" not in given:
            raise TrainConfigError("--data is required (unless --resume)")
        else:
            note = scale_warmup(given)
            if note:
                print(f"gptserve train: {note}", file=sys.stderr)
            config = TrainConfig(**given)
        result = train(
            config, resume=args.resume, command=shlex.join(command), progress=not args.no_progress
        )
    except (TrainConfigError, ConfigError, DataError, TrainError) as err:
        print(f"gptserve train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    minutes = result.elapsed_seconds / 60
    print(
        f"done: {result.iters_done} steps in {minutes:.1f} min; best val loss "
        f"{result.best_val_loss:.4f} at step {result.best_iter}, saved in {result.out_dir}"
    )
    return 0
