"""Int8 quantization keeps the model's behaviour close to float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_model
from model.config import GPTConfig
from model.generate import generate
from model.quantize import apply_quantization, direct_forward


def test_quantize_replaces_every_linear_and_stays_close() -> None:
    config = GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=50257, block_size=64)
    reference = make_model(config, seed=3)
    quantized = apply_quantization(make_model(config, seed=3), "int8")
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    idx = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, actual = reference(idx), quantized(idx)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() < 0.05 * scale
    # The cached path (what the engine runs) works on the quantized model too.
    tokens = generate(quantized, idx[0, :10].tolist(), 8)
    assert len(tokens) == 8


def test_reject_unknown_quantization() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        apply_quantization(make_model(), "int4")


def test_serve_setting_loads_quantized_engine(tmp_path) -> None:
    from model.loading import save_checkpoint
    from service.api.loader import ServeConfigError, load_engine
    from service.api.settings import Settings

    save_checkpoint(make_model(), tmp_path)
    engine, _ = load_engine(Settings(model=str(tmp_path), quantization="int8"))
    assert not any(type(m) is nn.Linear for m in engine.engine.model.modules())
    with pytest.raises(ServeConfigError, match="float32"):
        load_engine(Settings(model=str(tmp_path), quantization="int8", dtype="bfloat16"))


def test_direct_forward_is_the_int8_layers_own_result() -> None:
    quantized = apply_quantization(make_model(seed=4), "int8")
    layer = quantized.transformer.blocks[0].mlp.c_fc
    direct = direct_forward(layer)
    assert direct != layer.forward  # the kernel, called without torch.ao's wrapper
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        assert torch.equal(direct(x), layer(x))
    plain = nn.Linear(4, 2)
    assert direct_forward(plain) == plain.forward
