"""Checked tensor-to-model assembly, file readers with clear errors, and gptserve's own format.

Every loader funnels through `assemble_model`: it checks that a checkpoint holds exactly the tensors
a `GPT` of the given config needs, each of the right shape, before any is used. The model is built
on the `meta` device so no memory is spent on a random initialisation that would be overwritten.

The own format is a folder with two files:
- `gptserve.json`: `{"format": "gptserve", "format_version": 1, "config": {...}, "dtype": ...,
  "metadata": {...}}`, where `metadata` is free-form JSON (training run, data, step...).
- `model.safetensors`: each parameter once, named as in `GPT.state_dict()`. The head is tied to the
  token embedding, so only `transformer.wte.weight` is stored.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError, GPTConfig
from model.dtypes import dtype_name
from model.gpt2 import GPT

CONFIG_FILE = "gptserve.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "gptserve"
FORMAT_VERSION = 1
TOKEN_EMBEDDING = "transformer.wte.weight"
TIED_HEAD = "lm_head.weight"
_MAX_NAMES_IN_MESSAGE = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class SourceTensor:
    """A tensor as found in a checkpoint file, with what it takes to bring it into GPT's layout."""

    file_name: str  # its name in the file, for error messages
    tensor: torch.Tensor
    transpose: bool = False  # stored [in, out] (HF Conv1D) rather than nn.Linear's [out, in]

    def shape_for_model(self) -> tuple[int, ...]:
        """The shape the tensor has once brought into GPT's layout."""
        shape = tuple(self.tensor.shape)
        return shape[::-1] if self.transpose else shape


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint must provide (the tied head excluded)."""
    with torch.device("meta"):
        skeleton = GPT(config)
    return {
        name: tuple(tensor.shape)
        for name, tensor in skeleton.state_dict().items()
        if name != TIED_HEAD
    }


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_MESSAGE])
    more = len(names) - _MAX_NAMES_IN_MESSAGE
    return f"{shown} and {more} more" if more > 0 else shown


def _check_tensors(
    config: GPTConfig, tensors: Mapping[str, SourceTensor], source: str
) -> dict[str, tuple[int, ...]]:
    """Raise CheckpointError unless `tensors` is exactly what `config` needs; return the shapes."""
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {_name_list(missing)}")
    unexpected = [t.file_name for n, t in tensors.items() if n not in expected and n != TIED_HEAD]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_name_list(unexpected)}")
    for name, shape in expected.items():
        found = tensors[name]
        if found.shape_for_model() != shape:
            wanted = list(shape[::-1] if found.transpose else shape)
            raise CheckpointError(
                f"{source}: tensor {found.file_name} has shape {list(found.tensor.shape)}, but "
                f"the model's config ({_describe(config)}) needs {wanted}"
            )
        if not found.tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {found.file_name} has dtype {found.tensor.dtype}, "
                "expected floating point"
            )
    head = tensors.get(TIED_HEAD)
    if head is not None and not _same_values(head.tensor, tensors[TOKEN_EMBEDDING].tensor):
        raise CheckpointError(
            f"{source}: {head.file_name} differs from {tensors[TOKEN_EMBEDDING].file_name}; "
            "GPT-2's head is tied to the token embedding, and an untied head is not supported"
        )
    return expected


def _describe(config: GPTConfig) -> str:
    return (
        f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
        f"vocab_size={config.vocab_size}, block_size={config.block_size}"
    )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    # torch.save and safetensors keep a tied pair as one storage; then no comparison is needed.
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype:
        return True
    return torch.equal(a, b.to(a.dtype))


def assemble_model(
    config: GPTConfig,
    tensors: Mapping[str, SourceTensor],
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GPT:
    """Check `tensors` against `config`, then build a GPT (eval mode, no grads) holding copies.

    `tensors` maps GPT's parameter names to what the file holds; an optional `lm_head.weight`
    must equal the token embedding. `source` names the file in error messages.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    expected = _check_tensors(config, tensors, str(source))
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        found = tensors[name]
        # Always copy into fresh memory: safetensors and torch.load(mmap=True) return tensors
        # backed by the file's pages, and a file rewritten in place would crash us (SIGBUS).
        state[name] = torch.empty(shape, device=device, dtype=dtype)
        state[name].copy_(found.tensor.t() if found.transpose else found.tensor)
    state[TIED_HEAD] = state[TOKEN_EMBEDDING]
    with torch.device("meta"):
        model = GPT(config)
    # assign=True adopts our tensors instead of copying into the meta (storage-less) parameters.
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign replaced both Parameters; make the head share wte's again
    leftover = [name for name, t in model.state_dict().items() if t.is_meta]
    if leftover:
        raise RuntimeError(f"GPT has tensors no checkpoint provides: {_name_list(leftover)}")
    # A served model needs no gradients; this also keeps autograd from recording anything.
    return model.eval().requires_grad_(False)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, with errors that name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def read_torch_file(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers, with errors that name the file."""
    try:
        # mmap leaves a training checkpoint's optimizer state on disk; it needs the zip format
        # that torch.save has written since torch 1.6.
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False, which would run arbitrary code.
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else "unpickling failed"
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint, or it holds objects other than tensors and "
            f"plain containers ({detail})"
        ) from None
    except Exception as err:  # truncated zip archives, I/O errors, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None


def config_from_dict(data: Mapping[str, Any], source: str | os.PathLike[str]) -> GPTConfig:
    """GPTConfig.from_dict, with its errors turned into CheckpointErrors naming `source`."""
    try:
        return GPTConfig.from_dict(dict(data))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{source}: invalid model config: {err}") from None


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether `folder` is in gptserve's own format (judged by its config file)."""
    return (folder / CONFIG_FILE).is_file()


def save_checkpoint(
    model: GPT,
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write `model` to `folder` in gptserve's format, in `dtype` (default: the model's own)."""
    folder = Path(folder)
    head, embedding = model.get_parameter(TIED_HEAD), model.get_parameter(TOKEN_EMBEDDING)
    if head is not embedding and not _same_values(head, embedding):
        raise CheckpointError(f"{folder}: cannot save a model whose head is not tied to wte")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if name != TIED_HEAD
    }
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "dtype": dtype_name(tensors[TOKEN_EMBEDDING].dtype),
        "metadata": dict(extra_metadata or {}),
    }
    try:
        header_text = json.dumps(header, indent=2)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: metadata is not JSON ({err})") from None
    folder.mkdir(parents=True, exist_ok=True)
    # Write both files under temporary names first: a crash never leaves a half-written
    # checkpoint that looks complete. The config goes last since it marks the folder as ours.
    weights_tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, weights_tmp, metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); give it the usual permissions so a
    # checkpoint mounted into a container running as another user stays readable.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights_tmp, 0o666 & ~umask)
    os.replace(weights_tmp, folder / WEIGHTS_FILE)
    header_tmp = folder / f".{CONFIG_FILE}.tmp"
    header_tmp.write_text(header_text + "\n", encoding="utf-8")
    os.replace(header_tmp, folder / CONFIG_FILE)


def load_checkpoint(
    folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, dict[str, Any]]:
    """Load a folder written by `save_checkpoint`; returns the model and its metadata."""
    header_path = folder / CONFIG_FILE
    header = read_json(header_path)
    if header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{header_path}: not a gptserve checkpoint (no format: gptserve)")
    version = header.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{header_path}: format_version {version!r} is not supported by this gptserve "
            f"(it reads versions 1 to {FORMAT_VERSION}); upgrade gptserve"
        )
    raw_config = header.get("config")
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{header_path}: missing the 'config' object")
    config = config_from_dict(raw_config, header_path)
    metadata = header.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{header_path}: 'metadata' must be a JSON object")
    weights_path = folder / WEIGHTS_FILE
    tensors = {
        name: SourceTensor(name, tensor) for name, tensor in read_safetensors(weights_path).items()
    }
    return assemble_model(config, tensors, weights_path, device, dtype), metadata
