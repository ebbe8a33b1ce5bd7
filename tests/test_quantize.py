"""Int8 quantization keeps the model's behaviour close to float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_model
from model.config import GPTConfig
from model.generate import generate
from model.quantize import RoutedInt8Linear, apply_quantization, direct_forward, route_int8_rows


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


@pytest.mark.skipif(
    not {"x86", "onednn"} <= set(torch.backends.quantized.supported_engines),
    reason="needs torch's x86 and oneDNN int8 engines",
)
def test_routed_layers_take_the_many_row_engine_from_min_rows() -> None:
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        quantized = apply_quantization(make_model(seed=5), "int8")
        layer = quantized.transformer.blocks[0].attn.c_attn
        x_few, x_many = torch.randn(3, layer.in_features), torch.randn(5, layer.in_features)
        with torch.inference_mode():
            few_before, many_before = layer(x_few), layer(x_many)
        expected = 4 * quantized.config.n_layer + 1  # every block's four, and the head
        assert route_int8_rows(quantized, "onednn", min_rows=4) == expected
        assert torch.backends.quantized.engine == "x86"
        routed = quantized.transformer.blocks[0].attn.c_attn
        assert isinstance(routed, RoutedInt8Linear) and routed.layer is layer
        with torch.inference_mode():
            assert torch.equal(routed(x_few), few_before)  # 3 rows: the x86 packing, as before
            many = routed(x_many)  # 5 rows: oneDNN's packing of the same int8 weights
            torch.testing.assert_close(many, many_before, rtol=0, atol=1e-3)
            onednn = torch.ops.quantized.linear_dynamic(x_many, routed.many_rows_params, True)
            assert torch.equal(many, onednn)
            reference = make_model(seed=5)(torch.tensor([[5, 6, 7, 8, 9]]))
            torch.testing.assert_close(
                quantized(torch.tensor([[5, 6, 7, 8, 9]])), reference, rtol=0, atol=0.1
            )
    finally:
        torch.backends.quantized.engine = before
