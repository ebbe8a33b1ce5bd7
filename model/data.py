"""Training data: a plain text file as GPT-2 BPE tokens, split in two, sampled in random windows.

The split is on the token stream, not the characters: the first `1 - val_fraction` of the tokens
train, the rest validate, so no token is cut in half and the two parts never overlap.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model.tokenizer import Tokenizer


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file and the problem."""


@dataclass(frozen=True)
class TokenSplits:
    """A text file's tokens, split into a training and a validation part."""

    path: Path
    sha256: str  # of the file's bytes, so a checkpoint records exactly what it was trained on
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @property
    def num_tokens(self) -> int:
        """Tokens in both parts together."""
        return len(self.train) + len(self.val)


def read_text(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The file's text and the SHA-256 of its bytes; DataError if missing, unreadable or empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file; pass a plain text file to train on")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the data file is empty")
    return text, hashlib.sha256(raw).hexdigest()


def load_splits(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    val_fraction: float,
    block_size: int,
) -> TokenSplits:
    """Tokenize a text file and split it; each part must hold one window of block_size + 1."""
    text, sha256 = read_text(path)
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    num_val = int(round(len(tokens) * val_fraction))
    train, val = tokens[: len(tokens) - num_val], tokens[len(tokens) - num_val :]
    needed = block_size + 1  # a window of inputs plus the target after its last token
    if len(train) < needed or len(val) < needed:
        raise DataError(
            f"{path}: too small to train on: its {len(tokens)} tokens split into {len(train)} "
            f"for training and {len(val)} for validation, and each part needs at least "
            f"block_size + 1 = {needed}; use a larger file or a smaller block size"
        )
    return TokenSplits(Path(path), sha256, train, val)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows tokens[s : s + block_size + 1] for each start: (B, block_size + 1)."""
    offsets = torch.arange(block_size + 1)
    return tokens[starts.unsqueeze(1) + offsets]


class BatchSampler:
    """Random training windows drawn with its own seeded generator, so runs repeat exactly."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"need at least {block_size + 1} tokens, got {len(tokens)}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each (B, T)), the targets shifted one token to the left."""
        num_starts = len(self.tokens) - self.block_size  # starts 0 .. N - T - 1 fit T + 1 tokens
        starts = torch.randint(num_starts, (self.batch_size,), generator=self.generator)
        rows = _windows(self.tokens, starts, self.block_size)  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def get_state(self) -> torch.Tensor:
        """The generator's state, to save with a training run."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Continue from a state returned by `get_state`."""
        self.generator.set_state(state)


def fixed_batches(
    tokens: torch.Tensor, batch_size: int, block_size: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` batches of windows spread evenly over `tokens`, the same on every call.

    Evaluating on the same windows each time makes successive losses comparable, and spreading
    them covers the whole split rather than a random part of it.
    """
    last_start = len(tokens) - block_size - 1
    if last_start < 0:
        raise DataError(f"need at least {block_size + 1} tokens, got {len(tokens)}")
    num_windows = batch_size * num_batches
    starts = torch.linspace(0, last_start, num_windows).round().long()  # (num_windows,)
    rows = _windows(tokens, starts, block_size)  # (num_windows, T + 1)
    return [
        (chunk[:, :-1], chunk[:, 1:])
        for chunk in rows.split(batch_size)  # each (B, T + 1)
    ]
