"""`gptserve score` through a live server reproduces the bundled model's recorded val loss."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from api_fixtures import live_server

from model.data import load_splits
from model.tokenizer import Tokenizer
from service.api.loader import BUNDLED_MODEL_DIR, load_engine
from service.api.settings import Settings
from service.cli import main
from service.commands.score import consecutive_windows, score_windows, spread_windows

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT / "data" / "tinyshakespeare.txt"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_validation_loss_through_the_api_matches_training() -> None:
    recorded = json.loads((BUNDLED_MODEL_DIR / "gptserve.json").read_text())["metadata"]
    training = recorded["training"]
    config = training["config"]
    splits = load_splits(CORPUS, Tokenizer.default(), config["val_fraction"], config["block_size"])
    num_windows = config["batch_size"] * config["eval_batches"]
    windows = spread_windows(splits.val.tolist(), num_windows, config["block_size"])
    assert len(windows) == 64 and all(len(w) == config["block_size"] + 1 for w in windows)
    engine, _ = load_engine(Settings())  # the bundled model, as `gptserve serve` loads it
    with live_server(engine=engine) as server:
        result = asyncio.run(score_windows(server.url, None, windows, concurrency=8))
        assert result.num_scored_tokens == num_windows * config["block_size"]
        assert math.isclose(result.loss, training["val_loss"], rel_tol=0.01)
        # the command itself, with the flags the docs give
        argv = ["score", "--base-url", server.url, "--text", str(CORPUS)]
        argv += ["--val-fraction", "0.1", "--windows", "64", "--window-tokens", "256"]
        assert main(argv) == 0


def test_consecutive_windows_score_every_token_once() -> None:
    tokens = list(range(1000))
    windows = consecutive_windows(tokens, 256)
    assert [len(w) for w in windows] == [257, 257, 257, 232]
    scored = [token for window in windows for token in window[1:]]
    assert scored == tokens[1:]
