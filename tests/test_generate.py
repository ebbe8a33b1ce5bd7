"""The reference generation loop against `transformers`' own greedy generate."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model.generate import generate
from model.loading import load_model
from model.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[GPT2LMHeadModel, object]:
    torch.manual_seed(7)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    reference = GPT2LMHeadModel(config).eval()
    # Larger weights than the default init, so greedy choices are decided by clear margins.
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(folder)
    return reference, load_model(folder).model


@pytest.mark.parametrize("prompt", [[464], [15496, 995, 11], list(range(300, 340))])
def test_greedy_generate_equals_transformers(models, prompt: list[int]) -> None:
    reference, ours = models
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,  # no early stop at end-of-text: compare all 40 tokens
            pad_token_id=50256,
        )[0, len(prompt) :].tolist()
    assert generate(ours, prompt, 40) == expected


def test_generate_stops_at_eos_and_checks_limits(models) -> None:
    _, ours = models
    forced = SamplingParams(temperature=0.0, logit_bias={50256: 100.0})
    assert generate(ours, [1, 2], 10, forced, eos_token_id=50256) == [50256]
    with pytest.raises(ValueError, match="must fit"):
        generate(ours, list(range(100)), 29)
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [], 5)
