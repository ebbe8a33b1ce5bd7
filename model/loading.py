"""Load a GPT from any supported source, chosen by what `spec` names.

- a folder with `gptserve.json`: gptserve's own format (see `model.checkpoint`);
- a folder with `config.json`: a Hugging Face GPT-2 folder (`model.safetensors`, its sharded form,
  or `pytorch_model.bin`);
- a `.pt` / `.pth` file: a nanoGPT training checkpoint;
- `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` or `org/name`: a Hugging Face Hub model, taken
  from the local cache or downloaded (needs the optional `hub` extra, `huggingface_hub`).

nanoGPT pads GPT-2's vocabulary of 50257 to 50304 rows for speed. The padding rows belong to no
token, so such a checkpoint loads with `vocab_size` 50257 and those rows of the embedding (which
is also the head) cut off: the model never proposes an id the tokenizer cannot decode. Any other
vocabulary size is kept as the checkpoint has it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import (
    TIED_HEAD,
    TOKEN_EMBEDDING,
    WEIGHTS_FILE,
    CheckpointError,
    SourceTensor,
    assemble_model,
    config_from_dict,
    is_checkpoint_folder,
    load_checkpoint,
    read_json,
    read_safetensors,
    read_torch_file,
    save_checkpoint,
)
from model.config import GPTConfig
from model.gpt2 import GPT

__all__ = ["CheckpointError", "LoadedModel", "load_model", "save_checkpoint"]

GPT2_VOCAB_SIZE = 50257
NANOGPT_PADDED_VOCAB_SIZE = 50304
HF_CONFIG_FILE = "config.json"
HF_SHARD_INDEX_FILE = "model.safetensors.index.json"
HF_PICKLE_FILE = "pytorch_model.bin"
# HF's Conv1D stores these [in, out]; nn.Linear wants [out, in].
_HF_CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Causal-mask buffers that old HF and nanoGPT checkpoints carry; GPT computes the mask instead.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_HF_TRANSFORMER_PARTS = ("wte.", "wpe.", "h.", "ln_f.")
_HUB_WEIGHT_PATTERNS = ["model*.safetensors", HF_SHARD_INDEX_FILE]
_HUB_OTHER_PATTERNS = [HF_CONFIG_FILE, "vocab.json", "merges.txt"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from."""

    model: GPT  # eval mode, on the requested device and dtype
    config: GPTConfig
    name: str  # for display: folder name, hub name or checkpoint file stem
    source: str  # "hf-folder" | "hub" | "nanogpt" | "gptserve"
    tokenizer_dir: Path | None  # folder that may hold vocab.json / merges.txt
    metadata: dict[str, Any] = field(default_factory=dict)  # training info, when the file has it


def load_model(
    spec: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a GPT-2 model from a folder, a nanoGPT checkpoint or a Hub name (see module doc)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return _load_nanogpt(path, device, dtype)
        raise CheckpointError(
            f"{path}: cannot load a single {path.suffix or 'suffix-less'} file; pass a nanoGPT "
            "checkpoint (.pt/.pth) or the folder that holds the model's config and weights"
        )
    text = os.fspath(spec)
    if _looks_like_path(text):
        raise CheckpointError(f"{text}: no such file or directory")
    return _load_from_hub(text, device, dtype)


def _looks_like_path(text: str) -> bool:
    """Whether a spec that names nothing on disk was meant as a path rather than a Hub name."""
    if text.lower().endswith(_FILE_SUFFIXES) or "\\" in text:
        return True
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        return True
    return _HUB_ID.fullmatch(text) is None


def _load_folder(folder: Path, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    if is_checkpoint_folder(folder):
        model, metadata = load_checkpoint(folder, device, dtype)
        return LoadedModel(model, model.config, folder.name, "gptserve", None, metadata)
    if (folder / HF_CONFIG_FILE).is_file():
        model = _load_hf_folder(folder, device, dtype)
        return LoadedModel(model, model.config, folder.name, "hf-folder", folder)
    raise CheckpointError(
        f"{folder}: not a model folder: expected gptserve.json and {WEIGHTS_FILE} (gptserve's "
        f"format) or {HF_CONFIG_FILE} with weights (a Hugging Face GPT-2 folder)"
    )


def _hf_config(path: Path) -> GPTConfig:
    """GPTConfig from an HF config.json, refusing GPT-2 variants that GPT does not implement."""
    data = read_json(path)
    model_type = data.get("model_type")
    architectures = data.get("architectures") or []
    if model_type != "gpt2" and "GPT2LMHeadModel" not in architectures:
        found = model_type or ", ".join(map(str, architectures)) or "(none given)"
        raise CheckpointError(f"{path}: unknown architecture {found}; only GPT-2 is supported")
    n_embd = data.get("n_embd")
    # Options that change the computation away from what GPT implements.
    supported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None, 4 * n_embd if isinstance(n_embd, int) else None),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
    }
    for key, allowed in supported.items():
        if key in data and data[key] not in allowed:
            raise CheckpointError(f"{path}: unsupported GPT-2 variant: {key}={data[key]!r}")
    fields = {
        "n_layer": data.get("n_layer"),
        "n_head": data.get("n_head"),
        "n_embd": n_embd,
        "vocab_size": data.get("vocab_size"),
        "block_size": data.get("n_positions", data.get("n_ctx")),
        "layer_norm_epsilon": data.get("layer_norm_epsilon", 1e-5),
    }
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise CheckpointError(f"{path}: missing config field(s) {', '.join(missing)}")
    return config_from_dict(fields, path)


def _read_hf_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file (or shard index) of an HF folder, and all its tensors by HF name."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return single, read_safetensors(single)
    index = folder / HF_SHARD_INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing the 'weight_map' object")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            if Path(shard).name != shard:  # a shard outside the folder is not part of the model
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name")
            tensors.update(read_safetensors(folder / shard))
        return index, tensors
    pickled = folder / HF_PICKLE_FILE
    if pickled.is_file():
        state = read_torch_file(pickled)
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(f"{pickled}: expected a dict of tensors (a state dict)")
        return pickled, state
    raise CheckpointError(
        f"{folder}: no weights found: expected {WEIGHTS_FILE}, {HF_SHARD_INDEX_FILE} "
        f"or {HF_PICKLE_FILE}"
    )


def _hf_to_gpt_names(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, SourceTensor]:
    """Map HF names (with or without `transformer.`) to GPT's, marking Conv1D weights."""
    result: dict[str, SourceTensor] = {}
    for file_name, tensor in tensors.items():
        if file_name.endswith(_MASK_BUFFERS):
            continue
        bare = file_name.removeprefix("transformer.")
        name = f"transformer.{bare}" if bare.startswith(_HF_TRANSFORMER_PARTS) else file_name
        if name in result:
            raise CheckpointError(f"{source}: tensor {name} appears twice (as {file_name})")
        transpose = name.startswith("transformer.h.") and name.endswith(_HF_CONV1D_WEIGHTS)
        result[name] = SourceTensor(file_name, tensor, transpose)
    return result


def _load_hf_folder(folder: Path, device: str | torch.device, dtype: torch.dtype) -> GPT:
    config = _hf_config(folder / HF_CONFIG_FILE)
    weights_path, tensors = _read_hf_weights(folder)
    return assemble_model(
        config, _hf_to_gpt_names(tensors, weights_path), weights_path, device, dtype
    )


def _nanogpt_config(args: dict[str, Any], path: Path) -> GPTConfig:
    """GPTConfig from nanoGPT's `model_args`, with its padded vocabulary undone."""
    if args.get("bias", True) is not True:
        raise CheckpointError(
            f"{path}: nanoGPT model trained with bias=False; GPT-2 has biases in its linear "
            "and LayerNorm layers, so this model cannot be served as GPT-2"
        )
    keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    missing = [key for key in keys if key not in args]
    if missing:
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}")
    fields = {key: args[key] for key in keys}
    if fields["vocab_size"] == NANOGPT_PADDED_VOCAB_SIZE:
        fields["vocab_size"] = GPT2_VOCAB_SIZE
    return config_from_dict(fields, path)


def _nanogpt_tensors(
    state: dict[str, Any], config: GPTConfig, path: Path
) -> dict[str, SourceTensor]:
    """nanoGPT's state dict by GPT's names: its layout already matches, only prefixes differ."""
    result: dict[str, SourceTensor] = {}
    for file_name, tensor in state.items():
        name = str(file_name)
        while name.startswith(("_orig_mod.", "module.")):  # torch.compile / DDP wrappers
            name = name.split(".", 1)[1]
        if name.endswith(_MASK_BUFFERS):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {file_name} of 'model' is not a tensor")
        padded = tensor.shape[:1] == (NANOGPT_PADDED_VOCAB_SIZE,)
        if name in (TOKEN_EMBEDDING, TIED_HEAD) and padded:
            tensor = tensor[: config.vocab_size]  # the padding rows belong to no token
        if name in result:
            raise CheckpointError(f"{path}: tensor {name} appears twice (as {file_name})")
        result[name] = SourceTensor(str(file_name), tensor)
    return result


def _load_nanogpt(path: Path, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    checkpoint = read_torch_file(path)
    if not (
        isinstance(checkpoint, dict)
        and isinstance(checkpoint.get("model"), dict)
        and isinstance(checkpoint.get("model_args"), dict)
    ):
        raise CheckpointError(
            f"{path}: not a nanoGPT checkpoint (expected a dict with 'model' and 'model_args')"
        )
    config = _nanogpt_config(checkpoint["model_args"], path)
    tensors = _nanogpt_tensors(checkpoint["model"], config, path)
    model = assemble_model(config, tensors, path, device, dtype)
    metadata: dict[str, Any] = {}
    if isinstance(checkpoint.get("iter_num"), int):
        metadata["iter_num"] = checkpoint["iter_num"]
    best_val_loss = checkpoint.get("best_val_loss")  # nanoGPT saves a 0-d tensor
    if isinstance(best_val_loss, torch.Tensor) and best_val_loss.numel() == 1:
        metadata["best_val_loss"] = best_val_loss.item()
    return LoadedModel(model, config, path.stem, "nanogpt", None, metadata)


def _has_hf_weights(folder: Path) -> bool:
    names = (WEIGHTS_FILE, HF_SHARD_INDEX_FILE, HF_PICKLE_FILE)
    return (folder / HF_CONFIG_FILE).is_file() and any((folder / n).is_file() for n in names)


def _snapshot(hub: Any, repo_id: str, local_only: bool) -> Path:
    """Config, tokenizer and weights of `repo_id`: safetensors when published, else the pickle."""
    folder = Path(
        hub.snapshot_download(
            repo_id,
            allow_patterns=_HUB_OTHER_PATTERNS + _HUB_WEIGHT_PATTERNS,
            local_files_only=local_only,
        )
    )
    if not _has_hf_weights(folder):  # older repos publish only pytorch_model.bin
        folder = Path(
            hub.snapshot_download(
                repo_id,
                allow_patterns=_HUB_OTHER_PATTERNS + [HF_PICKLE_FILE],
                local_files_only=local_only,
            )
        )
    return folder


def _is_offline(hub: Any) -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(getattr(getattr(hub, "constants", None), "HF_HUB_OFFLINE", False))


def _hub_folder(repo_id: str) -> Path:
    """A local snapshot of `repo_id`, from the cache if there, else downloaded."""
    try:
        import huggingface_hub as hub
        from huggingface_hub.utils import RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such local file or folder, and loading a Hugging Face Hub model needs "
            "huggingface_hub: from the source tree, pip install '.[hub]'; or pass a local model folder"
        ) from None
    try:
        folder = _snapshot(hub, repo_id, local_only=True)
        if _has_hf_weights(folder):
            return folder
    except Exception:  # not (fully) cached; if the download fails too, it says why
        pass
    advice = (
        f"download it on a connected machine (huggingface-cli download {repo_id}) and copy the "
        "Hugging Face cache here, or pass a local model folder"
    )
    if _is_offline(hub):
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {advice}"
        )
    try:
        folder = _snapshot(hub, repo_id, local_only=False)
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such local file or folder, and no such model on the Hugging Face Hub "
            "(or it is private or gated)"
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and the download failed "
            f"({type(err).__name__}: {err}); {advice}"
        ) from None
    if not _has_hf_weights(folder):
        raise CheckpointError(f"{repo_id}: the Hub repo has no config.json with GPT-2 weights")
    return folder


def _load_from_hub(repo_id: str, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    folder = _hub_folder(repo_id)
    model = _load_hf_folder(folder, device, dtype)
    return LoadedModel(model, model.config, repo_id, "hub", folder)
