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
# The int8 kernel, as torch.ao's dynamic linear layer calls it (qint8 weights, reduce_range).
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


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
        weights = packed._packed_params

        def forward(x: torch.Tensor) -> torch.Tensor:
            return _LINEAR_DYNAMIC(x, weights, True)

        return forward
    return module.forward


class RoutedInt8Linear(nn.Module):
    """An int8 dynamic linear layer packed for two of torch's int8 engines: steps of fewer than
    `min_rows` rows run on the one packed for few rows, the others on the one packed for many.

    Which engine is faster depends on the row count: measured on a 2-core Xeon, gpt2's int8
    step took 5.8 ms at one row with x86 (fbgemm) against 8.5 with oneDNN, and 34.7 ms at 32
    rows with oneDNN against 41.2 with x86. Both run the same int8 weights and scales.
    """

    def __init__(self, layer: DynamicInt8Linear, engine: str, min_rows: int) -> None:
        super().__init__()
        self.layer = layer  # its packed weights are the few-row engine's
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.min_rows = min_rows
        weight, bias = layer._packed_params._weight_bias()
        original = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            self.many_rows_params = torch.ops.quantized.linear_prepack(weight, bias)
        finally:
            torch.backends.quantized.engine = original
        self.engine = engine
        self._few_rows_params = layer._packed_params._packed_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), float32."""
        rows = x.numel() // self.in_features
        params = self.many_rows_params if rows >= self.min_rows else self._few_rows_params
        return _LINEAR_DYNAMIC(x, params, True)


def route_int8_rows(model: nn.Module, engine: str, min_rows: int) -> int:
    """Give every int8 linear layer of `model` (after `quantize_int8`) a second packing for
    `engine`, used from `min_rows` rows on; returns how many layers were routed."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, DynamicInt8Linear) and not isinstance(parent, RoutedInt8Linear)
    ]
    for parent, name, layer in targets:
        setattr(parent, name, RoutedInt8Linear(layer, engine, min_rows))
    return len(targets)


def apply_quantization(model: GPT, quantization: str) -> GPT:
    """Apply a quantization by name ("none" or "int8")."""
    if quantization == "none":
        return model
    if quantization == "int8":
        return quantize_int8(model)
    raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
