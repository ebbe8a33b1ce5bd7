"""Int8 weights for CPU inference: the linear layers run through fbgemm's int8 kernels.

On a small CPU the decode step is bound by reading weights and by skinny fp32 matmuls; int8
weights with dynamically quantized activations cut both (2-4x per step on the 2-core machines
this project is measured on). Each output channel gets its own scale, which keeps GPT-2's
logits within a few tenths of the float32 ones. Embeddings and LayerNorms stay float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

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


def direct_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's forward; for an int8 dynamic linear layer, its kernel called directly.

    torch.ao's module wrapper and the op's Python-side dispatch checks (run on every call, since
    the op takes a packed-weight object) cost as much per layer as a small matmul: ~0.5 ms of a
    ~6 ms one-row gpt2 step. The call here is the wrapper's own, for the int8 weights this
    module makes (qint8, reduce_range as torch.ao's current version passes it); it holds on to
    the packed weights, so take it after the model's weights are final.
    """
    packed = getattr(module, "_packed_params", None)
    if (
        isinstance(module, DynamicInt8Linear)
        and packed is not None
        and packed.dtype == torch.qint8
        and getattr(module, "version", 0) >= 4
    ):
        op, weights = torch.ops.quantized.linear_dynamic.default, packed._packed_params

        def forward(x: torch.Tensor) -> torch.Tensor:
            return op(x, weights, True)

        return forward
    return module.forward


def apply_quantization(model: GPT, quantization: str) -> GPT:
    """Apply a quantization by name ("none" or "int8")."""
    if quantization == "none":
        return model
    if quantization == "int8":
        return quantize_int8(model)
    raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
