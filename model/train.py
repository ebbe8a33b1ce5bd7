"""Train a GPT on a text file, in the spirit of nanoGPT (pure torch; see `gptserve train`).

The out folder receives two things: the best-validation-loss weights in gptserve's own format
(`gptserve.json` + `model.safetensors`, what `load_model` reads), rewritten whenever validation
improves, and `train_state.pt` (current weights, optimizer, step, RNG states, loss history),
rewritten at every evaluation, from which `resume=True` continues exactly as if never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.data import BatchSampler, TokenSplits, fixed_batches, load_splits
from model.dtypes import DTYPES
from model.generate import generate
from model.gpt2 import GPT
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from model.train_config import TrainConfig, TrainConfigError
from model.train_state import (
    TRAIN_STATE_FILE,
    TrainError,
    check_resumable,
    prepare_out_dir,
    read_train_state,
    resume_config,
    write_train_state,
)

# Re-exported so callers need one import for a whole run (the CLI, tests, notebooks).
__all__ = ["TRAIN_STATE_FILE", "TrainConfig", "TrainError", "TrainResult", "Trainer"]
__all__ += ["lr_at", "make_optimizer", "resume_config", "train"]

SAMPLE_PROMPT = "\n"
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 100


@dataclass
class TrainResult:
    """What a run did; losses are nats per token."""

    out_dir: Path
    iters_done: int
    train_losses: list[float]  # the training batch's loss at each step, from the first step
    evals: list[dict[str, Any]]  # {"iter", "train_loss", "val_loss", "lr"} per evaluation
    best_val_loss: float
    best_iter: int  # the step whose weights the checkpoint holds (0 if none evaluated yet)
    elapsed_seconds: float  # over all runs of this training, resumes included
    samples: list[str] = field(default_factory=list)  # one per evaluation of this process


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of 0-based step `step`: linear warm-up, then cosine decay to min_lr."""
    if step < config.warmup_iters:  # the last warm-up step is at the peak
        return config.learning_rate * (step + 1) / config.warmup_iters
    decay_steps = config.max_iters - config.warmup_iters  # >= 1, checked by TrainConfig
    progress = min(1.0, (step + 1 - config.warmup_iters) / decay_steps)  # 1 at the last step
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not on biases and LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied head appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))


def resolve_device(name: str) -> torch.device:
    """cpu / cuda / cuda:N as given; auto picks cuda when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainConfigError(f"device {name!r} requested but CUDA is not available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TrainConfigError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    command: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run (or with `resume`, continue) training; `stop_at` ends early after that step, resumable.

    Every input is checked before the first step: device, data file, output folder, saved state.
    """
    trainer = Trainer(config, resume=resume, command=command, log=log or tqdm.write)
    return trainer.run(stop_at=stop_at, progress=progress)


class Trainer:
    """The state of one training run: model, optimizer, data, history; `run` drives it."""

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        command: str | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.command = command
        self.log = log
        self.device = resolve_device(config.device)
        self.tokenizer = Tokenizer.default()
        self.splits: TokenSplits = load_splits(
            config.data, self.tokenizer, config.val_fraction, config.block_size
        )
        self.out_dir = Path(config.out_dir)
        prepare_out_dir(self.out_dir, resume)
        saved = read_train_state(self.out_dir) if resume else None
        if saved is not None:
            check_resumable(saved, config, self.splits.sha256)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)

        torch.manual_seed(config.seed)  # dropout draws from the global generator
        self.model = GPT(config.model_config(), dropout=config.dropout).init_weights(config.seed)
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, config)
        self.sampler = BatchSampler(
            self.splits.train, config.batch_size, config.block_size, config.seed
        )
        self.eval_sets = {
            name: fixed_batches(tokens, config.batch_size, config.block_size, config.eval_batches)
            for name, tokens in (("train", self.splits.train), ("val", self.splits.val))
        }
        self.step = 0
        self.train_losses: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.best_val_loss = math.inf
        self.best_iter = 0
        self.elapsed_before = 0.0  # seconds spent by earlier runs of this training
        self.samples: list[str] = []
        self._bar: tqdm | None = None  # the progress bar of a running `run`
        if saved is not None:
            self._restore(saved)

    def _show_phase(self, phase: str) -> None:
        """Name what the run is doing on its progress bar (evaluations take a while)."""
        if self._bar is not None:
            self._bar.set_description_str(phase, refresh=True)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with self._autocast():
            logits = self.model(inputs)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def train_step(self) -> float:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss."""
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(self.config.grad_accum_steps):
            loss = self._loss(*self.sampler.next_batch()) / self.config.grad_accum_steps
            loss.backward()
            total += loss.item()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.train_losses.append(total)
        return total

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the fixed batches of each split, in eval mode (no dropout)."""
        self.model.eval()
        losses = {
            f"{name}_loss": sum(self._loss(x, y).item() for x, y in batches) / len(batches)
            for name, batches in self.eval_sets.items()
        }
        self.model.train()
        return {"iter": self.step, **losses, "lr": lr_at(self.step - 1, self.config)}

    def sample(self) -> str:
        """A short continuation of SAMPLE_PROMPT, seeded so successive samples compare."""
        prompt = self.tokenizer.encode(SAMPLE_PROMPT)
        num_tokens = min(self.config.sample_tokens, self.config.block_size - len(prompt))
        if num_tokens < 1:  # a block_size of 1 leaves no room after the prompt
            return SAMPLE_PROMPT
        self.model.eval()
        params = SamplingParams(SAMPLE_TEMPERATURE, SAMPLE_TOP_K, seed=self.config.seed)
        tokens = generate(self.model, prompt, num_tokens, params, self.tokenizer.eos_token_id)
        self.model.train()
        return self.tokenizer.decode(prompt + tokens)

    def run(self, stop_at: int | None = None, progress: bool = True) -> TrainResult:
        """Train up to max_iters (or `stop_at`), evaluating and saving every eval_interval."""
        config = self.config
        last = config.max_iters if stop_at is None else min(stop_at, config.max_iters)
        started = time.perf_counter()
        bar = tqdm(total=config.max_iters, initial=self.step, disable=not progress, unit="it")
        self._bar = bar
        self._show_phase("training")
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < last:
                loss = self.train_step()
                window_steps += 1
                rate = window_steps * config.tokens_per_iter / (time.perf_counter() - window_start)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if self.step % config.eval_interval == 0 or self.step == config.max_iters:
                    self._evaluate_and_save(self.elapsed_before + time.perf_counter() - started)
                    window_start, window_steps = time.perf_counter(), 0
        except KeyboardInterrupt:
            bar.close()
            self._bar = None
            if self.evals:
                saved_at = self.evals[-1]["iter"]
                self.log(f"interrupted at step {self.step}; resuming continues from {saved_at}")
            else:
                self.log(f"interrupted at step {self.step}, before the first save")
            raise
        bar.close()
        self._bar = None
        elapsed = self.elapsed_before + time.perf_counter() - started
        if self.step < config.max_iters:  # stopped early: leave a state to resume from
            self._save_state(elapsed)
        return TrainResult(
            self.out_dir,
            self.step,
            list(self.train_losses),
            list(self.evals),
            self.best_val_loss,
            self.best_iter,
            elapsed,
            list(self.samples),
        )

    def _evaluate_and_save(self, elapsed: float) -> None:
        self._show_phase("evaluating")
        record = self.evaluate()
        self.evals.append(record)
        is_best = record["val_loss"] < self.best_val_loss
        if is_best:
            self.best_val_loss, self.best_iter = record["val_loss"], self.step
            save_checkpoint(
                self.model,
                self.out_dir,
                dtype=DTYPES[self.config.save_dtype],
                extra_metadata={"training": self._metadata(record, elapsed)},
            )
        self.log(
            f"step {self.step}: train loss {record['train_loss']:.4f}, "
            f"val loss {record['val_loss']:.4f}, lr {record['lr']:.2e}"
            + (" (best so far, saved)" if is_best else "")
        )
        if self.config.sample_tokens > 0:
            self._show_phase("sampling")
            text = self.sample()
            self.samples.append(text)
            self.log(f"--- sample at step {self.step} ---{text}\n---")
        self._show_phase("saving")
        self._save_state(elapsed)
        self._show_phase("training")

    def _metadata(self, record: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """What the checkpoint records about how it was made."""
        val_share = f"{self.config.val_fraction:.0%}"
        return {
            "command": self.command,
            "config": self.config.to_dict(),
            "iter": self.step,
            "max_iters": self.config.max_iters,
            "train_loss": record["train_loss"],
            "val_loss": record["val_loss"],
            "history": list(self.evals),
            "elapsed_seconds": round(elapsed, 1),
            "device": str(self.device),
            "torch_version": torch.__version__,
            "data": {
                "file": self.splits.path.name,
                "sha256": self.splits.sha256,
                "tokenizer": self.tokenizer.name,
                "num_train_tokens": len(self.splits.train),
                "num_val_tokens": len(self.splits.val),
                "split": f"GPT-2 BPE token stream; the last {val_share} of tokens validate",
            },
        }

    def _save_state(self, elapsed: float) -> None:
        """Write train_state.pt atomically (a crash never leaves a half-written one)."""
        rng = {"torch": torch.get_rng_state(), "sampler": self.sampler.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config": self.config.to_dict(),
            "data_sha256": self.splits.sha256,
            "iter": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "train_losses": self.train_losses,
            "evals": self.evals,
            "best_val_loss": self.best_val_loss,
            "best_iter": self.best_iter,
            "elapsed_seconds": elapsed,
        }
        write_train_state(self.out_dir, state)

    def _restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step = int(saved["iter"])
        self.train_losses = list(saved["train_losses"])
        self.evals = list(saved["evals"])
        self.best_val_loss = float(saved["best_val_loss"])
        self.best_iter = int(saved["best_iter"])
        self.elapsed_before = float(saved["elapsed_seconds"])
        torch.set_rng_state(saved["rng"]["torch"])
        self.sampler.set_state(saved["rng"]["sampler"])
        if self.device.type == "cuda" and "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
