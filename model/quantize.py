"""Int8 weights for CPU inference: the linear layers run through fbgemm's int8 kernels.

On a small CPU the decode step is bound by reading weights and by skinny fp32 matmuls; int8
weights with dynamically quantized activations cut both (2-4x per step on the 2-core machines
this project is measured on). Each output channel gets its own scale, which keeps GPT-2's
logits within a few tenths of the float32 ones. Embeddings and LayerNorms stay float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.gpt2 import GPT

QUANTIZATIONS = ("none", "int8")


def quantize_int8(model: GPT) -> GPT:
    """Return `model` with every nn.Linear (the head too) replaced by an int8 dynamic one."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"int8 quantization runs on CPU float32 models, got {model.device} {model.dtype}"
        )
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao but still supported;
        # torchao's CPU int8 path needs a newer stack than this project pins.
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return quantized.eval()


def apply_quantization(model: GPT, quantization: str) -> GPT:
    """Apply a quantization by name ("none" or "int8")."""
    if quantization == "none":
        return model
    if quantization == "int8":
        return quantize_int8(model)
    raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
