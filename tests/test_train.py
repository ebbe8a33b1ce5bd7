"""`gptserve train`: the loop, its checkpoints, resume, reproducibility and its input checks."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from model.data import BatchSampler, DataError, fixed_batches
from model.loading import load_model
from model.train import TRAIN_STATE_FILE, Trainer, TrainError, lr_at, resume_config, train
from model.train_config import TrainConfig, TrainConfigError
from service.cli import main

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n" * 40
REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "model" / "assets" / "bundled"
BUNDLED_DOC = REPO / "docs" / "bundled-model.md"


def quiet(*_: object) -> None:
    """A log function that drops its message."""


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_config(data: Path, out_dir: Path, **changes: object) -> TrainConfig:
    """A model and run small enough to train in well under a second per step."""
    settings: dict[str, object] = dict(
        data=str(data),
        out_dir=str(out_dir),
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        batch_size=4,
        dropout=0.1,
        max_iters=8,
        warmup_iters=2,
        learning_rate=1e-2,
        min_lr=1e-3,
        eval_interval=4,
        eval_batches=2,
        sample_tokens=4,
        save_dtype="float32",
    )
    settings.update(changes)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def run(config: TrainConfig, **kwargs: object):  # type: ignore[no-untyped-def]
    return train(config, progress=False, log=quiet, **kwargs)  # type: ignore[arg-type]


def test_training_reduces_loss(data_file: Path, tmp_path: Path) -> None:
    config = tiny_config(data_file, tmp_path / "out", max_iters=30, eval_interval=30, dropout=0.0)
    result = run(config)
    assert len(result.train_losses) == 30
    # Starts near ln(50257) = 10.8, a uniform guess; a repeated sentence is quickly learned.
    assert result.train_losses[0] > 9.5
    assert result.evals[-1]["train_loss"] < result.train_losses[0] - 4.0
    assert result.evals[-1]["val_loss"] < result.train_losses[0] - 4.0


def test_checkpoint_loads_with_identical_logits(data_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    config = tiny_config(data_file, out_dir, eval_interval=8)  # one evaluation, at the end
    trainer = Trainer(config, resume=False, command="gptserve train ...", log=quiet)
    result = trainer.run(progress=False)
    loaded = load_model(out_dir)
    assert loaded.source == "gptserve" and loaded.config == config.model_config()
    tokens = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), trainer.model(tokens))
    info = loaded.metadata["training"]
    assert info["iter"] == result.best_iter == 8
    assert info["val_loss"] == result.best_val_loss
    assert info["command"] == "gptserve train ..."
    assert info["config"] == config.to_dict()
    assert info["data"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert (out_dir / TRAIN_STATE_FILE).is_file()


def test_checkpoint_stores_float16_by_default(data_file: Path, tmp_path: Path) -> None:
    config = tiny_config(data_file, tmp_path / "out", save_dtype="float16", max_iters=4)
    trainer = Trainer(config, resume=False, command=None, log=quiet)
    trainer.run(progress=False)
    with safe_open(str(tmp_path / "out" / WEIGHTS_FILE), "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {torch.float16}
    tokens = torch.tensor([[464, 2068, 7586, 21831]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(tokens)
        actual = load_model(tmp_path / "out").model(tokens)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


def test_checkpoint_keeps_best_validation_weights(
    data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Script the validation losses (best at the second of three evaluations) so the test does
    # not depend on how a real run's losses happen to move; the weights are real.
    scripted = iter([3.0, 1.0, 2.0])
    evaluate = Trainer.evaluate
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def scripted_evaluate(self: Trainer) -> dict[str, object]:
        record = evaluate(self)
        snapshots[self.step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {**record, "val_loss": next(scripted)}

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    config = tiny_config(data_file, tmp_path / "out", max_iters=12, save_dtype="float32")
    result = run(config)
    assert [record["val_loss"] for record in result.evals] == [3.0, 1.0, 2.0]
    best_iter = result.evals[1]["iter"]
    loaded = load_model(tmp_path / "out")
    info = loaded.metadata["training"]
    assert info["iter"] == result.best_iter == best_iter and info["val_loss"] == 1.0
    saved = loaded.model.state_dict()
    for name, value in snapshots[best_iter].items():
        torch.testing.assert_close(saved[name], value)
    final = snapshots[result.evals[-1]["iter"]]
    assert any(not torch.equal(saved[name], final[name]) for name in final)


def test_resume_matches_uninterrupted_run(data_file: Path, tmp_path: Path) -> None:
    whole = run(tiny_config(data_file, tmp_path / "whole"))
    config = tiny_config(data_file, tmp_path / "parts")
    first = run(config, stop_at=5)  # between evaluations, so the stop itself saves the state
    assert first.iters_done == 5
    resumed = run(resume_config(tmp_path / "parts", {}), resume=True)
    assert resumed.train_losses == whole.train_losses
    assert resumed.evals == whole.evals
    whole_weights = load_model(tmp_path / "whole").model.state_dict()
    resumed_weights = load_model(tmp_path / "parts").model.state_dict()
    assert all(torch.equal(whole_weights[k], resumed_weights[k]) for k in whole_weights)


def test_same_seed_gives_same_losses(data_file: Path, tmp_path: Path) -> None:
    first = run(tiny_config(data_file, tmp_path / "a", max_iters=5, eval_interval=5))
    second = run(tiny_config(data_file, tmp_path / "b", max_iters=5, eval_interval=5))
    other_seed = run(tiny_config(data_file, tmp_path / "c", max_iters=5, eval_interval=5, seed=7))
    assert first.train_losses == second.train_losses
    assert first.evals == second.evals
    assert first.train_losses != other_seed.train_losses


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    config = TrainConfig(
        data="x", out_dir="y", max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4
    )
    rates = [lr_at(step, config) for step in range(config.max_iters)]
    warmup, decay = rates[:10], rates[9:]
    assert all(b - a == pytest.approx(1e-4) for a, b in pairwise(warmup))
    assert max(rates) == rates[9] == pytest.approx(config.learning_rate)
    assert all(b < a for a, b in pairwise(decay))
    assert rates[-1] == pytest.approx(config.min_lr)
    # Half-way through the 90 decay steps the cosine is at 0: half-way between the two rates.
    assert rates[9 + 45] == pytest.approx((config.learning_rate + config.min_lr) / 2)


def test_batches_shift_targets_by_one() -> None:
    tokens = torch.arange(100)
    inputs, targets = BatchSampler(tokens, batch_size=3, block_size=8, seed=0).next_batch()
    assert inputs.shape == targets.shape == (3, 8)
    assert torch.equal(targets, inputs + 1)  # arange: the next token is one more
    again = BatchSampler(tokens, batch_size=3, block_size=8, seed=0).next_batch()
    assert torch.equal(again[0], inputs)
    batches = fixed_batches(tokens, batch_size=2, block_size=8, num_batches=3)
    starts = [int(row[0]) for x, _ in batches for row in x]
    assert starts[0] == 0 and starts[-1] == 100 - 9  # spread over the whole split


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such data file"),
        ("", "the data file is empty"),
        ("  \n\n ", "the data file is empty"),
        ("Too short.\n" * 3, "too small to train on: its 12 tokens split into 11 for training"),
        (b"\xff\xfe not text", "not UTF-8 text"),
    ],
)
def test_bad_data_fails_before_training(
    tmp_path: Path, content: str | bytes | None, problem: str
) -> None:
    path = tmp_path / "corpus.txt"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {re.escape(problem)}"):
        run(tiny_config(path, out_dir))
    assert not out_dir.exists()  # checked before anything was created or trained


def test_unwritable_out_dir_fails_before_training(data_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainError, match="exists and is not a folder"):
        run(tiny_config(data_file, blocker))
    with pytest.raises(TrainError, match="cannot write to the output folder"):
        run(tiny_config(data_file, blocker / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_out_dir_fails_before_training(data_file: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(TrainError, match="cannot write to the output folder"):
        run(tiny_config(data_file, locked))
    assert list(locked.iterdir()) == []


def test_existing_run_is_not_overwritten(data_file: Path, tmp_path: Path) -> None:
    config = tiny_config(data_file, tmp_path / "out", max_iters=4)
    run(config)
    before = (tmp_path / "out" / CONFIG_FILE).read_bytes()
    with pytest.raises(TrainError, match="already holds a training run"):
        run(config)
    assert (tmp_path / "out" / CONFIG_FILE).read_bytes() == before
    with pytest.raises(TrainError, match="no train_state.pt to resume from"):
        run(replace(config, out_dir=str(tmp_path / "empty")), resume=True)


def test_resume_refuses_changed_settings(data_file: Path, tmp_path: Path) -> None:
    run(tiny_config(data_file, tmp_path / "out"), stop_at=2)
    with pytest.raises(TrainConfigError, match="cannot change n_embd 16 -> 32 when resuming"):
        resume_config(tmp_path / "out", {"n_embd": 32})
    assert resume_config(tmp_path / "out", {"max_iters": 20}).max_iters == 20
    data_file.write_text(TEXT + "More words.\n", encoding="utf-8")
    with pytest.raises(TrainError, match="the data file changed"):
        run(resume_config(tmp_path / "out", {}), resume=True)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd (30) must be divisible by n_head (4)"),
        ({"warmup_iters": 8}, "warmup_iters (8) must be less than max_iters (8)"),
        ({"learning_rate": 0.0}, "learning_rate must be a number in (0, inf]"),
        ({"min_lr": 1.0}, "min_lr must be a number in [0, 0.01]"),
        ({"dropout": 1.0}, "dropout must be a number in [0, 1)"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"val_fraction": 1.0}, "val_fraction must be a number in (0, 1)"),
        ({"grad_clip": math.nan}, "grad_clip must be a number in [0, inf]"),
        ({"device": "gpu"}, "device must be cpu, cuda, cuda:N or auto"),
        ({"save_dtype": "int8"}, "save_dtype must be one of float32, bfloat16, float16"),
    ],
)
def test_invalid_config_is_rejected(
    data_file: Path, tmp_path: Path, changes: dict[str, object], problem: str
) -> None:
    with pytest.raises(TrainConfigError, match=re.escape(problem)):
        tiny_config(data_file, tmp_path / "out", **changes)


def test_cli_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in shown
    assert "--resume" in shown


def test_cli_reports_bad_input(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.txt"
    code = main(["train", "--data", str(missing), "--out-dir", str(tmp_path / "out")])
    assert code == 2
    assert f"gptserve train: error: {missing}: no such data file" in capsys.readouterr().err
    code = main(["train", "--data", str(data_file), "--out-dir", "x", "--n-head", "3"])
    assert code == 2
    assert "n_embd (128) must be divisible by n_head (3)" in capsys.readouterr().err
    assert main(["train", "--data", str(data_file)]) == 2
    assert "--out-dir is required" in capsys.readouterr().err


def test_cli_trains_and_resumes(tmp_path: Path, data_file: Path) -> None:
    out_dir = tmp_path / "out"
    flags = ["--data", str(data_file), "--out-dir", str(out_dir), "--n-layer", "1"]
    flags += ["--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2"]
    flags += ["--max-iters", "2", "--warmup-iters", "1", "--eval-interval", "2", "--no-progress"]
    assert main(["train", *flags, "--eval-batches", "1", "--sample-tokens", "0"]) == 0
    info = load_model(out_dir).metadata["training"]
    assert info["command"].startswith(f"gptserve train --data {data_file} --out-dir {out_dir}")
    assert info["iter"] == 2
    extend = ["train", "--out-dir", str(out_dir), "--resume", "--max-iters", "4", "--no-progress"]
    assert main(extend) == 0
    assert load_model(out_dir).metadata["training"]["history"][-1]["iter"] == 4


def _documented_config(doc: str) -> dict[str, int]:
    """The `| n_layer | 4 |` style rows of the architecture table in docs/bundled-model.md."""
    names = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
    found = {name: re.search(rf"^\|\s*`?{name}`?\s*\|\s*(\d+)\s*\|", doc, re.M) for name in names}
    return {name: int(match.group(1)) for name, match in found.items() if match}


@pytest.mark.skipif(not (BUNDLED / CONFIG_FILE).is_file(), reason="no bundled checkpoint yet")
def test_bundled_checkpoint_matches_its_documentation() -> None:
    size = sum(path.stat().st_size for path in BUNDLED.iterdir())
    assert size <= 30 * 1024 * 1024
    loaded = load_model(BUNDLED)
    doc = BUNDLED_DOC.read_text(encoding="utf-8")
    documented = _documented_config(doc)
    assert len(documented) == 5
    assert documented == {name: getattr(loaded.config, name) for name in documented}
    info = loaded.metadata["training"]
    assert info["val_loss"] <= 5.0
    assert info["command"] in doc  # the exact command that made it
    assert f"{info['val_loss']:.3f}" in doc
