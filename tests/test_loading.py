"""Loading weights from every supported format, and the errors bad checkpoints give."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from conftest import make_hf_model
from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from model.config import GPTConfig
from model.gpt2 import GPT
from model.loading import CheckpointError, LoadedModel, load_model, save_checkpoint

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, block_size=64)
TOLERANCE = 1e-4
TOKENS = torch.tensor([[5, 17, 256, 999, 0, 42, 7, 3], [1, 2, 3, 4, 5, 6, 7, 8]])


def starts(where: object, problem: str) -> str:
    """A regex for an error message that begins by naming `where`, then states `problem`."""
    return f"^{re.escape(str(where))}: {problem}"


def make_gpt(config: GPTConfig = CONFIG, seed: int = 0) -> GPT:
    """One of our models with random weights everywhere."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


def hf_logits(reference: GPT2LMHeadModel, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return reference(tokens).logits


def our_logits(model: GPT, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens.to(next(model.parameters()).device)).float().cpu()


def assert_tied(model: GPT) -> None:
    head = model.get_parameter("lm_head.weight")
    embedding = model.get_parameter("transformer.wte.weight")
    assert head is embedding
    assert head.data_ptr() == embedding.data_ptr()


@pytest.fixture(scope="module")
def hf_reference() -> GPT2LMHeadModel:
    return make_hf_model(CONFIG)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, hf_reference: GPT2LMHeadModel) -> Path:
    """A Hugging Face folder as `save_pretrained` writes it (model.safetensors)."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_reference.save_pretrained(folder)
    return folder


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped folder, for a test to damage."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def rewrite_safetensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply `edit` to the tensors of a safetensors file and write them back."""
    tensors = load_file(path)
    edit(tensors)
    save_file({name: t.contiguous() for name, t in tensors.items()}, path)


# ---------------------------------------------------------------- Hugging Face folders


def test_load_hf_safetensors_folder_matches_transformers(
    hf_folder: Path, hf_reference: GPT2LMHeadModel
) -> None:
    loaded = load_model(hf_folder)
    assert (loaded.source, loaded.name, loaded.tokenizer_dir) == (
        "hf-folder",
        "tiny-gpt2",
        hf_folder,
    )
    assert loaded.config == CONFIG
    assert not loaded.model.training
    diff = (our_logits(loaded.model) - hf_logits(hf_reference)).abs().max().item()
    assert diff <= TOLERANCE
    assert_tied(loaded.model)


def test_load_hf_pytorch_bin_with_bare_names_and_mask_buffers(
    tmp_path: Path, hf_reference: GPT2LMHeadModel
) -> None:
    # The published GPT-2 pickles: names without `transformer.`, causal-mask buffers, a tied head.
    # transformers 5 always writes safetensors, so the file is written here the old way.
    state = {name.removeprefix("transformer."): t for name, t in hf_reference.state_dict().items()}
    for layer in range(CONFIG.n_layer):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    hf_reference.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path)
    diff = (our_logits(loaded.model) - hf_logits(hf_reference)).abs().max().item()
    assert diff <= TOLERANCE
    assert_tied(loaded.model)


def test_load_hf_sharded_safetensors(tmp_path: Path, hf_reference: GPT2LMHeadModel) -> None:
    hf_reference.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / WEIGHTS_FILE).exists()
    loaded = load_model(tmp_path)
    diff = (our_logits(loaded.model) - hf_logits(hf_reference)).abs().max().item()
    assert diff <= TOLERANCE


def test_load_hf_bare_gpt2model_folder(tmp_path: Path, hf_reference: GPT2LMHeadModel) -> None:
    # GPT2Model (no head) saves its names without the `transformer.` prefix.
    hf_reference.transformer.save_pretrained(tmp_path)
    assert all(not n.startswith("transformer.") for n in load_file(tmp_path / WEIGHTS_FILE))
    loaded = load_model(tmp_path)
    diff = (our_logits(loaded.model) - hf_logits(hf_reference)).abs().max().item()
    assert diff <= TOLERANCE


# ---------------------------------------------------------------- nanoGPT checkpoints


def write_nanogpt_checkpoint(model: GPT, path: Path, **model_args: object) -> None:
    """A checkpoint as nanoGPT's train.py writes it after torch.compile."""
    config = model.config
    state = {f"_orig_mod.{name}": t for name, t in model.state_dict().items()}
    args: dict[str, object] = dict(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        block_size=config.block_size,
        bias=True,
        vocab_size=config.vocab_size,
        dropout=0.0,
    )
    args.update(model_args)
    checkpoint = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0, 1]}]},
        "model_args": args,
        "iter_num": 7,
        "best_val_loss": torch.tensor(2.5),
        "config": {"dataset": "shakespeare", "batch_size": 12},
    }
    torch.save(checkpoint, path)


def test_load_nanogpt_checkpoint_with_compile_prefix(tmp_path: Path) -> None:
    reference = make_gpt()
    write_nanogpt_checkpoint(reference, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert (loaded.source, loaded.name, loaded.tokenizer_dir) == ("nanogpt", "ckpt", None)
    assert loaded.config == CONFIG
    assert loaded.metadata == {"iter_num": 7, "best_val_loss": 2.5}
    assert torch.equal(our_logits(loaded.model), our_logits(reference))
    assert_tied(loaded.model)


def test_load_nanogpt_padded_vocab_as_gpt2_vocab(tmp_path: Path) -> None:
    padded = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50304, block_size=64)
    reference = make_gpt(padded)
    write_nanogpt_checkpoint(reference, tmp_path / "padded.pth")
    loaded = load_model(tmp_path / "padded.pth")
    assert loaded.config.vocab_size == 50257
    assert torch.equal(our_logits(loaded.model), our_logits(reference)[..., :50257])


def test_reject_nanogpt_without_bias(tmp_path: Path) -> None:
    write_nanogpt_checkpoint(make_gpt(), tmp_path / "nobias.pt", bias=False)
    with pytest.raises(CheckpointError, match=r"nobias\.pt.*bias=False"):
        load_model(tmp_path / "nobias.pt")


# ---------------------------------------------------------------- gptserve's own format


def test_save_checkpoint_round_trips_tensors_and_logits(tmp_path: Path) -> None:
    reference = make_gpt()
    folder = tmp_path / "my-model"
    save_checkpoint(reference, folder, extra_metadata={"steps": 100, "data": "shakespeare"})
    assert set(load_file(folder / WEIGHTS_FILE)) == set(reference.state_dict()) - {"lm_head.weight"}
    loaded = load_model(folder)
    assert (loaded.source, loaded.name, loaded.tokenizer_dir) == ("gptserve", "my-model", None)
    assert loaded.config == CONFIG
    assert loaded.metadata == {"steps": 100, "data": "shakespeare"}
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert torch.equal(our_logits(loaded.model), our_logits(reference))
    assert_tied(loaded.model)


def test_save_checkpoint_files_readable_by_others(tmp_path: Path) -> None:
    save_checkpoint(make_gpt(), tmp_path)
    # Same permissions as any file this process writes (umask applied), not owner-only.
    config_mode = (tmp_path / "gptserve.json").stat().st_mode & 0o777
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == config_mode


def test_save_checkpoint_in_bfloat16(tmp_path: Path) -> None:
    reference = make_gpt()
    save_checkpoint(reference, tmp_path / "fp32")
    save_checkpoint(reference, tmp_path / "bf16", dtype=torch.bfloat16)
    stored = load_file(tmp_path / "bf16" / WEIGHTS_FILE)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    small, full = (tmp_path / d / WEIGHTS_FILE for d in ("bf16", "fp32"))
    assert small.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_model(tmp_path / "bf16")  # read back in float32, the default
    expected = reference.get_parameter("transformer.h.1.mlp.c_fc.weight").to(torch.bfloat16)
    actual = loaded.model.get_parameter("transformer.h.1.mlp.c_fc.weight")
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected.float())


# ---------------------------------------------------------------- dtype and device


def test_load_model_in_bfloat16_on_cpu(hf_folder: Path, hf_reference: GPT2LMHeadModel) -> None:
    loaded = load_model(hf_folder, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert_tied(loaded.model)
    logits = our_logits(loaded.model)
    assert torch.isfinite(logits).all()
    # bf16 keeps about 3 significant digits: close to the fp32 reference, not equal to it.
    expected = hf_logits(hf_reference)
    assert (logits - expected).abs().max().item() < 0.1 * expected.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_model_on_cuda(hf_folder: Path, hf_reference: GPT2LMHeadModel) -> None:
    loaded = load_model(hf_folder, device="cuda", dtype=torch.float16)
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    assert_tied(loaded.model)
    diff = (our_logits(loaded.model) - hf_logits(hf_reference)).abs().max().item()
    assert diff < 1e-2


def test_reject_integer_dtype(hf_folder: Path) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        load_model(hf_folder, dtype=torch.int64)


# ---------------------------------------------------------------- Hugging Face Hub


def test_load_hub_name_from_cache(
    monkeypatch: pytest.MonkeyPatch, hf_folder: Path, hf_reference: GPT2LMHeadModel
) -> None:
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(hf_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_model("openai-community/gpt2")
    assert (loaded.source, loaded.name) == ("hub", "openai-community/gpt2")
    assert loaded.tokenizer_dir == hf_folder
    assert calls[0]["repo_id"] == "openai-community/gpt2"
    assert calls[0]["local_files_only"] is True
    assert len(calls) == 1  # cached: no download attempted
    patterns = calls[0]["allow_patterns"]
    assert {"config.json", "vocab.json", "merges.txt"} <= set(patterns)
    assert any(fnmatch("model.safetensors", pattern) for pattern in patterns)
    diff = (our_logits(loaded.model) - hf_logits(hf_reference)).abs().max().item()
    assert diff <= TOLERANCE


def test_load_hub_name_downloads_when_not_cached(
    monkeypatch: pytest.MonkeyPatch, hf_folder: Path
) -> None:
    def fake_snapshot_download(repo_id: str, *, local_files_only: bool, **kwargs: object) -> str:
        if local_files_only:
            raise LocalEntryNotFoundError("not in cache")
        return str(hf_folder)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_model("gpt2").source == "hub"


def test_report_hub_name_not_cached_and_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # huggingface_hub reads these variables once at import, so its constants are patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as raised:
        load_model("gpt2-medium")
    message = str(raised.value)
    assert message.startswith("gpt2-medium:")
    assert "HF_HUB_OFFLINE" in message
    assert "connected machine" in message and "local model folder" in message


class MissingRepo(RepositoryNotFoundError):
    """What the Hub raises for an unknown repo, without a real HTTP response behind it."""

    def __init__(self) -> None:
        Exception.__init__(self, "404 Client Error: Repository Not Found")


@pytest.mark.parametrize(
    ("online_error", "expected"),
    [
        (ConnectionError("network unreachable"), "download failed.*network unreachable"),
        (MissingRepo(), "no such model on the Hugging Face Hub"),
    ],
)
def test_report_hub_download_failure(
    monkeypatch: pytest.MonkeyPatch, online_error: Exception, expected: str
) -> None:
    def fake_snapshot_download(repo_id: str, *, local_files_only: bool, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("not in cache") if local_files_only else online_error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match=f"^someone/tiny-gpt2: .*{expected}"):
        load_model("someone/tiny-gpt2")


def test_report_hub_name_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(CheckpointError, match=r"^gpt2-xl: .*pip install '\.\[hub\]'"):
        load_model("gpt2-xl")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "spec", ["no/such/folder", "./gpt2", "missing.pt", "/nonexistent-dir/model.safetensors"]
)
def test_report_missing_path(spec: str) -> None:
    with pytest.raises(CheckpointError, match=starts(spec, "no such file or directory")):
        load_model(spec)


def test_report_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=starts(tmp_path, "not a model folder")):
        load_model(tmp_path)


def test_report_unsupported_single_file(hf_folder: Path) -> None:
    weights = hf_folder / WEIGHTS_FILE
    with pytest.raises(CheckpointError, match=starts(weights, "cannot load a single .safetensors")):
        load_model(weights)


def test_report_truncated_safetensors(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=starts(weights, "not a readable safetensors file")):
        load_model(folder)


def test_report_garbage_pt_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"\x80\x02garbage" * 50)
    with pytest.raises(CheckpointError, match=starts(path, "not a PyTorch checkpoint")) as raised:
        load_model(path)
    assert "weights_only=False" not in str(raised.value)  # never advise running untrusted code


def test_report_truncated_pt_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    write_nanogpt_checkpoint(make_gpt(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=starts(path, "not a readable PyTorch checkpoint")):
        load_model(path)


def test_report_pt_file_that_is_not_nanogpt(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(make_gpt().state_dict(), path)
    with pytest.raises(CheckpointError, match=starts(path, "not a nanoGPT checkpoint")):
        load_model(path)


def test_report_config_json_that_is_not_json(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(
        CheckpointError, match=starts(folder / "config.json", "not a readable JSON")
    ):
        load_model(folder)


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_report_unknown_architecture(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    edit_config(folder, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture llama"):
        load_model(folder)


def test_report_unsupported_gpt2_variant(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    edit_config(folder, activation_function="relu")
    with pytest.raises(CheckpointError, match="unsupported GPT-2 variant: activation_function"):
        load_model(folder)


def test_report_tensor_of_wrong_shape(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    edit_config(folder, n_positions=128)
    with pytest.raises(CheckpointError) as raised:
        load_model(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder / WEIGHTS_FILE}: tensor transformer.wpe.weight")
    assert "[64, 32]" in message and "[128, 32]" in message


def test_report_conv1d_shape_in_file_layout(hf_folder: Path, tmp_path: Path) -> None:
    # Shapes are reported as the file stores them ([in, out] for HF Conv1D), not transposed.
    folder = copy_folder(hf_folder, tmp_path)

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["transformer.h.1.attn.c_attn.weight"] = torch.zeros(32, 90)

    rewrite_safetensors(folder / WEIGHTS_FILE, shrink)
    with pytest.raises(CheckpointError, match=r"c_attn\.weight has shape \[32, 90\].*\[32, 96\]"):
        load_model(folder)


def test_report_missing_tensor(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    rewrite_safetensors(folder / WEIGHTS_FILE, lambda t: t.pop("transformer.ln_f.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) transformer\.ln_f\.bias$"):
        load_model(folder)


def test_report_unexpected_tensor(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["transformer.h.0.attn.rotary"] = torch.zeros(4)

    rewrite_safetensors(folder / WEIGHTS_FILE, add)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor\(s\) transformer\.h\.0\.attn\.rot"
    ):
        load_model(folder)


def test_report_untied_head(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)

    def untie(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])

    rewrite_safetensors(folder / WEIGHTS_FILE, untie)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from"):
        load_model(folder)


def test_report_newer_own_format(tmp_path: Path) -> None:
    save_checkpoint(make_gpt(), tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(CheckpointError, match=starts(tmp_path / CONFIG_FILE, "format_version 99")):
        load_model(tmp_path)


def test_load_model_accepts_str_spec(hf_folder: Path) -> None:
    loaded = load_model(str(hf_folder))
    assert isinstance(loaded, LoadedModel)
    assert loaded.config is loaded.model.config


def test_loaded_weights_ignore_later_rewrites_of_the_file(tmp_path: Path) -> None:
    # safetensors maps the file into memory; a model still backed by it would change (or crash
    # with SIGBUS) when a training run rewrites the checkpoint in place.
    save_checkpoint(make_gpt(), tmp_path)
    loaded = load_model(tmp_path)
    before = our_logits(loaded.model)
    weights = tmp_path / WEIGHTS_FILE
    header_size = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with weights.open("r+b") as file:  # same inode, same size, zeroed tensor data
        file.seek(header_size)
        file.write(bytes(weights.stat().st_size - header_size))
    assert torch.equal(our_logits(loaded.model), before)


def test_reject_saving_metadata_that_is_not_json(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError, match=starts(tmp_path / CONFIG_FILE, "metadata is not JSON")
    ):
        save_checkpoint(make_gpt(), tmp_path, extra_metadata={"started": object()})
    assert not (tmp_path / CONFIG_FILE).exists()
