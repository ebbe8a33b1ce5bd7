"""oneDNN-packed linear weights: same logits, same parameters, the packed path really used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_model
from model.decode import DecodeStep
from model.generate import generate
from model.gpt2 import GPT
from model.kv_cache import KVCache
from model.packed_linear import PACKED_MIN_ROWS, PackedLinear, pack_linears, packing_available
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")


@pytest.fixture()
def pair() -> tuple[GPT, GPT]:
    """A packed model and an unpacked copy of the same weights."""
    packed, plain = make_model(seed=3), make_model(seed=3)
    pack_linears(packed)
    return packed, plain


def test_packing_keeps_parameters_names_and_tying(pair: tuple[GPT, GPT]) -> None:
    packed, plain = pair
    linears = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, PackedLinear) for m in linears)
    assert len(linears) == 4 * packed.config.n_layer + 1  # 4 per block, and the head
    assert packed.lm_head.weight is packed.transformer.wte.weight
    assert list(packed.state_dict()) == list(plain.state_dict())
    for (name, a), (_, b) in zip(
        packed.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert pack_linears(packed) == 0  # packing twice adds nothing


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 32, 100])
def test_packed_logits_match_the_plain_ones(pair: tuple[GPT, GPT], rows: int) -> None:
    packed, plain = pair
    idx = torch.randint(0, 50257, (1, rows), generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        expected, got = plain(idx), packed(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_path_is_taken_from_min_rows_on(pair: tuple[GPT, GPT], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    packed, _ = pair
    calls: list[int] = []
    original = torch.ops.mkldnn._linear_pointwise

    def counting(x, *args):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return original(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    head = packed.lm_head
    with torch.inference_mode():
        head(torch.randn(PACKED_MIN_ROWS - 1, packed.config.n_embd))
        assert calls == []
        head(torch.randn(2, PACKED_MIN_ROWS, packed.config.n_embd))
        assert calls == [2 * PACKED_MIN_ROWS]
        head(torch.randn(64, packed.config.n_embd))
        assert calls == [2 * PACKED_MIN_ROWS, 64]
    # With autograd on (training), the plain weight is used: oneDNN's op has no backward.
    head(torch.randn(8, packed.config.n_embd)).sum().backward()
    assert calls == [2 * PACKED_MIN_ROWS, 64]


def test_the_mlp_gelu_runs_inside_the_packed_kernel(pair: tuple[GPT, GPT], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The up-projection's GELU is oneDNN's post-op from min_rows on, in the model's MLP and in
    the lean decode step, and it gives what torch's GELU after the matmul gives."""
    packed, _ = pair
    up = packed.transformer.blocks[0].mlp.c_fc
    assert isinstance(up, PackedLinear)
    activations: list[tuple[int, str]] = []
    original = torch.ops.mkldnn._linear_pointwise

    def recording(x, weight, bias, activation, scalars, algorithm):  # type: ignore[no-untyped-def]
        activations.append((x.shape[0], activation))
        return original(x, weight, bias, activation, scalars, algorithm)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", recording)
    x = torch.randn(
        3, PACKED_MIN_ROWS, packed.config.n_embd, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        fused = up.forward_gelu(x)
        assert activations == [(3 * PACKED_MIN_ROWS, "gelu")]
        reference = torch.nn.functional.gelu(
            torch.nn.functional.linear(x, up.weight, up.bias), approximate="tanh"
        )
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
        up.forward_gelu(x[0, : PACKED_MIN_ROWS - 1])  # too few rows: torch's matmul and GELU
        assert len(activations) == 1
        activations.clear()
        packed(torch.arange(PACKED_MIN_ROWS)[None])  # a prompt through every block
        gelus = [rows for rows, activation in activations if activation == "gelu"]
        assert gelus == [PACKED_MIN_ROWS] * packed.config.n_layer
        activations.clear()
        cache = KVCache(packed.config, num_slots=PACKED_MIN_ROWS)
        slots = list(range(PACKED_MIN_ROWS))
        DecodeStep(packed)(cache, [5] * PACKED_MIN_ROWS, slots, [0] * PACKED_MIN_ROWS)
        gelus = [rows for rows, activation in activations if activation == "gelu"]
        assert gelus == [PACKED_MIN_ROWS] * packed.config.n_layer
    # With autograd on (training), the plain weight and torch's GELU are used, with gradients.
    activations.clear()
    weight = up.weight.detach().clone().requires_grad_()
    up.forward_gelu(x).sum().backward()
    assert activations == []
    reference = torch.nn.functional.gelu(
        torch.nn.functional.linear(x, weight, up.bias.detach()), approximate="tanh"
    )
    reference.sum().backward()
    assert up.weight.grad is not None and weight.grad is not None
    torch.testing.assert_close(up.weight.grad, weight.grad)


def test_engine_with_packed_weights_gives_the_reference_tokens(pair: tuple[GPT, GPT]) -> None:
    packed, plain = pair
    engine = LLMEngine(packed, Tokenizer.default(), EngineConfig(max_batch_size=8))
    prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
    requests = [
        engine.add_request(p, SamplingParams(temperature=0.0), StopParams(10, ignore_eos=True))
        for p in prompts
    ]
    while engine.has_work():
        engine.step()
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.output_token_ids == generate(plain, prompt, 10)


def test_a_weight_changed_after_packing_is_packed_again(pair: tuple[GPT, GPT]) -> None:
    packed, plain = pair
    fresh = make_model(seed=4)
    packed.load_state_dict(fresh.state_dict())  # copy_ into the packed model's parameters
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, expected, old = packed(idx), fresh(idx), plain(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_only_cpu_float32_models_are_packed(dtype: torch.dtype) -> None:
    model = make_model().to(dtype)
    with pytest.raises(ValueError, match="CPU float32 models"):
        pack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # all or nothing


def test_serve_packs_cpu_weights_unless_told_not_to(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from model import kernel_choice
    from model.loading import save_checkpoint
    from service.api.loader import load_engine
    from service.api.settings import Settings

    save_checkpoint(make_model(), tmp_path)
    # What the start-up measures depends on the machine and its load (on a tiny model, under a
    # busy test run, MKL can win everywhere): say the packed kernel won from 4 rows.
    monkeypatch.setattr(
        kernel_choice, "choose_packed_min_rows", lambda model, rows: kernel_choice.KernelChoice(4)
    )

    def linear_types(settings: Settings) -> set[type]:
        engine, _ = load_engine(settings)
        return {type(m) for m in engine.engine.model.modules()}

    on_cpu = {"model": str(tmp_path), "device": "cpu"}
    assert PackedLinear in linear_types(Settings(**on_cpu))
    unpacked = linear_types(Settings(**on_cpu, pack_weights=False))
    assert nn.Linear in unpacked and PackedLinear not in unpacked
    assert PackedLinear not in linear_types(Settings(**on_cpu, quantization="int8"))
    assert PackedLinear not in linear_types(Settings(**on_cpu, dtype="bfloat16"))
