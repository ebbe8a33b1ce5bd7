"""Float32 linear layers on AMX, each product as three bfloat16 products (bf16x3), for batches.

On CPUs with AMX (Intel Sapphire Rapids and later) a float32 matmul can run on the bfloat16
tiles: each float32 number is the sum of two bfloat16 ones, and three of the four products
(all but the two small halves') are accumulated in float32 (model/native/matmul_bf16x3.c). This
is torch's float32 matmul precision "high" (16 bits of mantissa in the products, against 24),
not "highest". Measured on a 2-core Xeon with AMX, gpt2's 12 blocks and head at 32 rows took
~22 ms against ~38 ms through oneDNN's packed float32 kernel, and a 960-row prompt chunk ~330
against ~640 ms; a gpt2 step's logits came out within ~6e-5 of float32's, whose own rounding
against float64 is ~1e-5.

`choose_bf16x3` (model.kernel_choice) takes it only where it is faster, from the row count it
wins at, and only after checking the served model's logits against the float32 kernels
(`check_logits`); `--float32-matmul-precision highest` keeps float32 kernels throughout. The
packed weight (hi and lo halves: the float32 weight's size again) replaces oneDNN's packed copy.
Steps of fewer rows keep the float32 path (MKL, or the compiled decode step, which reads the
float32 weight), as does anything with gradients.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

from model.native_decode import NativeUnavailable, load_library

logger = logging.getLogger(__name__)

# the logits of a probe with these kernels and with float32 ones may differ by at most
# max(ABSOLUTE, RELATIVE * the largest |logit|); measured: 6.3e-5 on the bundled model (largest
# logit 13), 3.9e-5 on a random gpt2 (2.9)
CHECK_ABSOLUTE = 1e-4
CHECK_RELATIVE = 1e-5


def bf16x3_unavailable() -> str | None:
    """Why these kernels cannot run here, or None where they can."""
    try:
        lib = load_library()
    except NativeUnavailable as exc:
        return f"the compiled library is unavailable: {exc}"
    if not lib.gptserve_bf16x3_ready():
        return (
            "no AMX bfloat16 tiles: the CPU has none, the kernel refused them to this process, "
            "or the library was built for a level without them"
        )
    return None


_scratch = threading.local()


def _scratch_for(nbytes: int) -> torch.Tensor:
    """A per-thread buffer of at least `nbytes`, kept between calls."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        _scratch.buffer = buffer
    return buffer


class Bf16x3Linear(nn.Linear):
    """An nn.Linear (same parameters, same names) whose forward runs on AMX as bf16x3 for
    inputs of `min_rows` rows or more."""

    packed: torch.Tensor
    min_rows: int
    _packed_from: tuple[int, int]

    @classmethod
    def from_linear(cls, linear: nn.Linear, min_rows: int) -> Bf16x3Linear:
        """Wrap `linear`'s own parameters (shared, not copied) and pack its weight."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.register_parameter("bias", linear.bias)
        layer.min_rows = min_rows
        layer.repack()
        return layer

    def _weight_state(self) -> tuple[int, int]:
        return self.weight.data_ptr(), self.weight._version

    def repack(self) -> None:
        """Pack the weight as it is now."""
        lib = load_library()
        weight = self.weight.detach().contiguous()  # row-major, whatever its layout here
        nbytes = lib.gptserve_bf16x3_packed_bytes(self.out_features, self.in_features)
        self.packed = torch.empty(nbytes, dtype=torch.uint8)
        if lib.gptserve_bf16x3_pack(
            weight.data_ptr(), self.out_features, self.in_features, self.packed.data_ptr()
        ):
            raise NativeUnavailable("the compiled library was built without AMX")
        self._packed_from = self._weight_state()

    def relaid(self) -> None:
        """The weight was laid out anew with the same values (model.weight_layout): keep the
        packed copy."""
        self._packed_from = self._weight_state()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        rows = x.numel() // self.in_features
        if rows < self.min_rows or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return self._run(x, rows, gelu=False)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(forward(x)), tanh approximation (GPT-2's MLP), applied to each output tile
        while it is in cache."""
        rows = x.numel() // self.in_features
        if rows < self.min_rows or torch.is_grad_enabled():
            return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")
        return self._run(x, rows, gelu=True)

    def _run(self, x: torch.Tensor, rows: int, gelu: bool) -> torch.Tensor:
        if self._weight_state() != self._packed_from:  # loaded or updated since packing
            self.repack()
        if x.dtype != torch.float32:
            raise ValueError(f"bf16x3 linears take float32 rows, got {x.dtype}")
        flat = x.reshape(rows, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        lib = load_library()
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        scratch = _scratch_for(lib.gptserve_bf16x3_scratch_bytes(rows, self.in_features))
        bias = self.bias.data_ptr() if self.bias is not None else None
        failed = lib.gptserve_bf16x3_linear(
            flat.data_ptr(),
            rows,
            self.in_features,
            flat.stride(0),
            self.packed.data_ptr(),
            self.out_features,
            bias,
            int(gelu),
            out.data_ptr(),
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
        if failed:
            raise NativeUnavailable("the AMX tiles were refused to this process")
        return out.view(*x.shape[:-1], self.out_features)


class Swap:
    """A model's float32 linear layers and bf16x3 stand-ins for them (packed now), to put in
    or take out together. Tied weights stay tied (the stand-ins share the parameters)."""

    def __init__(self, model: nn.Module, min_rows: int) -> None:
        reason = bf16x3_unavailable()
        if reason is not None:
            raise NativeUnavailable(reason)
        self.places = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, nn.Linear)
            and not isinstance(child, Bf16x3Linear)
            and child.weight.dtype == torch.float32
            and child.weight.device.type == "cpu"
        ]
        self.layers = [Bf16x3Linear.from_linear(linear, min_rows) for _, _, linear in self.places]

    def put_in(self) -> None:
        for (parent, name, _), layer in zip(self.places, self.layers, strict=True):
            setattr(parent, name, layer)

    def take_out(self) -> None:
        for parent, name, linear in self.places:
            setattr(parent, name, linear)

    def packed_bytes(self) -> int:
        return sum(layer.packed.numel() for layer in self.layers)


def set_min_rows(model: nn.Module, min_rows: int) -> None:
    """Change the row count from which the model's Bf16x3Linear layers take their kernel."""
    for module in model.modules():
        if isinstance(module, Bf16x3Linear):
            module.min_rows = min_rows


CHECK_TOKENS = 64  # the logit check's prompt: one row of this many tokens


def check_logits(model: nn.Module, min_rows: int) -> tuple[bool, float]:
    """Whether `model`'s logits for a probe prompt with its Bf16x3Linear layers on agree with
    its float32 kernels' within max(CHECK_ABSOLUTE, CHECK_RELATIVE * the largest |logit|), and
    the largest difference. Leaves the layers at `min_rows`."""
    config = getattr(model, "config", None)
    length = min(CHECK_TOKENS, getattr(config, "block_size", CHECK_TOKENS))
    vocab = getattr(config, "vocab_size", 50257)
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        set_min_rows(model, 1 << 30)
        try:
            reference = model(tokens).float()
            set_min_rows(model, 1)
            got = model(tokens).float()
        finally:
            set_min_rows(model, min_rows)
    difference = (got - reference).abs().max().item()
    bound = max(CHECK_ABSOLUTE, CHECK_RELATIVE * reference.abs().max().item())
    return difference <= bound, difference
