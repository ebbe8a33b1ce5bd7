"""`gptserve train` for a first run: a short run scales the warm-up, a used folder names --resume,
and the progress bar says when it evaluates and samples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model.checkpoint import CONFIG_FILE
from model.loading import load_model
from model.train import train
from model.train_config import TrainConfig, TrainConfigError
from service.cli import main
from service.commands.train import DEFAULT_WARMUP_ITERS

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n" * 40
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16"]
TINY += ["--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_scale_the_default_warmup_down_for_a_short_run(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert TrainConfig("x", "y").warmup_iters == DEFAULT_WARMUP_ITERS
    out_dir = tmp_path / "short"
    flags = ["--data", str(data_file), "--out-dir", str(out_dir), "--max-iters", "30", *TINY]
    assert main(["train", *flags]) == 0
    err = capsys.readouterr().err
    assert "warming up for 3" in err and "--warmup-iters" in err
    info = load_model(out_dir).metadata["training"]
    assert info["config"]["warmup_iters"] == 3
    assert "--warmup-iters" not in info["command"]  # the command as it was typed


def test_keep_a_given_warmup_and_name_the_flag_when_it_does_not_fit(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--data", str(data_file), "--out-dir", str(tmp_path / "out"), "--max-iters", "5"]
    assert main(["train", *flags, "--warmup-iters", "5", *TINY]) == 2
    assert "pass a smaller --warmup-iters" in capsys.readouterr().err
    with pytest.raises(TrainConfigError, match=re.escape("warmup_iters (100) must be less than")):
        TrainConfig(str(data_file), str(tmp_path), max_iters=50)


def test_name_resume_when_the_output_folder_holds_a_run(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    flags = ["--data", str(data_file), "--out-dir", str(out_dir), "--max-iters", "2", *TINY]
    assert main(["train", *flags]) == 0
    assert (out_dir / CONFIG_FILE).is_file()
    capsys.readouterr()
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--out-dir" in err


def test_show_evaluating_and_sampling_on_the_progress_bar(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TrainConfig(
        str(data_file),
        str(tmp_path / "bar"),
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        batch_size=2,
        max_iters=2,
        warmup_iters=1,
        eval_interval=2,
        eval_batches=1,
        sample_tokens=2,
    )
    train(config, progress=True, log=lambda _: None)
    bar = capsys.readouterr().err  # tqdm writes to stderr
    for phase in ("training", "evaluating", "sampling", "saving"):
        assert f"{phase}:" in bar, phase
