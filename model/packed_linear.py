"""Linear layers that also keep their weight in oneDNN's blocked layout, for CPU serving.

On the CPU, decoding with a handful of rows (batch 4-32) is where the matmul path matters most:
MKL's GEMM for so few rows rereads the weights for every few rows, while oneDNN's GEMM over a
weight packed once ahead of time reads them once. Measured on this project's 2-core machine, a
gpt2 decode step (float32) went from 38 to 25 ms at batch 4, 53 to 30 ms at batch 8 and 67 to
57 ms at batch 32; prompt chunks got 10% faster. At 1-3 rows MKL's matrix-vector kernels are
faster, so those keep the plain weight; where the plain weights are stored column-major for
faster one-row steps (model.weight_layout), MKL is slow from 2 rows and the packed copy takes over
from there. The row count is measured at start-up (model.kernel_choice).

The packed copy costs a second copy of every linear weight (the tied head's included). Should a
weight change after packing (a reload, an in-place update), the next call packs it again.
Float32 only: oneDNN's bfloat16 path needs AVX-512 or AVX-NE-CONVERT, which not every CPU has.
oneDNN builds a kernel for each new row count (about 0.5-1 ms, once per layer shape, cached).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 4  # below this many rows MKL's matrix-vector path wins (see the docstring)
PACK_BATCH_HINT = 32  # the row count oneDNN tunes the blocked layout for
PACKABLE_DTYPES = (torch.float32,)


def packing_available() -> bool:
    """Whether this torch build has the oneDNN ops the packed linears use."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An nn.Linear (same parameters, same names) whose forward uses a packed copy of the
    weight for inputs of `min_rows` rows or more."""

    packed_weight: torch.Tensor
    min_rows: int
    _packed_from: tuple[int, int]  # the weight's (data_ptr, version) when it was packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, min_rows: int = PACKED_MIN_ROWS) -> PackedLinear:
        """Wrap `linear`'s own parameters (shared, not copied) and pack its weight."""
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight = linear.weight
        packed.register_parameter("bias", linear.bias)
        packed.min_rows = min_rows
        packed.repack()
        return packed

    def _weight_state(self) -> tuple[int, int]:
        return self.weight.data_ptr(), self.weight._version

    def repack(self) -> None:
        """Pack the weight as it is now."""
        weight = self.weight.detach().contiguous()  # row-major, whatever its layout here
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self._packed_from = self._weight_state()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        rows = x.numel() // self.in_features
        if rows < self.min_rows or torch.is_grad_enabled():  # oneDNN's op has no backward
            return F.linear(x, self.weight, self.bias)
        return self._packed(x, rows, "none", "")

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(forward(x)), tanh approximation (GPT-2's MLP). On the packed kernel the GELU
        runs inside oneDNN's matmul, on its output while it is still in cache, instead of as
        a pass of its own over the 4x-wide activations: on a 2-core Xeon that took ~1.5-2 ms
        off a ~70 ms gpt2 decode step of 32 rows and ~3% off prompt steps. oneDNN's GELU and
        torch's agree to ~1e-7."""
        rows = x.numel() // self.in_features
        if rows < self.min_rows or torch.is_grad_enabled():
            return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")
        return self._packed(x, rows, "gelu", "tanh")

    def _packed(self, x: torch.Tensor, rows: int, activation: str, algorithm: str) -> torch.Tensor:
        if self._weight_state() != self._packed_from:  # loaded or updated since packing
            self.repack()
        flat = x.reshape(rows, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(
            flat, self.packed_weight, self.bias, activation, [], algorithm
        )
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, min_rows: int = PACKED_MIN_ROWS) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear in place; returns the bytes added.

    Tied weights stay tied (the head shares the embedding's parameter as before). Raises
    ValueError, before changing anything, for weights that are not CPU float32, or without
    oneDNN.
    """
    if not packing_available():
        raise ValueError("this torch build has no oneDNN (mkldnn) linear ops to pack weights for")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and not isinstance(child, PackedLinear)
    ]
    for _, name, linear in targets:
        weight = linear.weight
        if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
            raise ValueError(
                f"packed weights are for CPU float32 models, got {name}.weight on "
                f"{weight.device} as {weight.dtype}"
            )
    added = 0
    for parent, name, linear in targets:
        setattr(parent, name, PackedLinear.from_linear(linear, min_rows))
        added += linear.weight.numel() * linear.weight.element_size()
    logger.info("packed %d linear layers for oneDNN (%.0f MiB more)", len(targets), added / 2**20)
    return added
