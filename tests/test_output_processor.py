"""Stop conditions and streamed text, without a model: fixed token sequences in, events out."""

from __future__ import annotations

import pytest

from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.output_processor import OutputProcessor
from service.engine.params import StopParams
from service.engine.request import FinishReason, Request
from service.engine.runner import SampledToken

TOKENIZER = Tokenizer.default()


def feed(texts: list[str], stop: StopParams) -> tuple[Request, list[str]]:
    """Feed the tokens of `texts` (one token each) and return the request and streamed pieces."""
    processor = OutputProcessor(TOKENIZER, TOKENIZER.eos_token_id)
    max_total = 1 + (stop.max_new_tokens or 1000)
    request = Request("r", [1], SamplingParams(), stop, max_total, sink=lambda _: None)
    processor.prepare(request)
    pieces = []
    for text in texts:
        (token,) = TOKENIZER.encode(text)
        event = processor.process(request, SampledToken(token, 0.0))
        pieces.append(event.text)
        if event.finished:
            break
    return request, pieces


def test_stop_string_before_min_tokens_does_not_cut_later() -> None:
    request, pieces = feed(["a", "b", "c", "d"], StopParams(4, stop=["ab"], min_tokens=3))
    assert "".join(pieces) == request.output_text == "abcd"
    assert request.finish_reason is FinishReason.LENGTH


def test_stop_string_split_across_tokens_is_held_back_then_cut() -> None:
    request, pieces = feed([" the", " end", " of", " it"], StopParams(10, stop=["end of"]))
    # "e" and then "end" could start the stop string, so they wait for the next token.
    assert pieces == [" th", "e ", ""]
    assert request.output_text == " the " and request.finish_reason is FinishReason.STOP


def test_held_back_text_released_when_it_cannot_be_a_stop_string() -> None:
    _, pieces = feed([" the", " end", " was", " near"], StopParams(4, stop=["end of"]))
    assert pieces == [" th", "e ", "end was", " near"]


def test_earliest_of_several_stop_strings_wins() -> None:
    request, _ = feed([" one", " two", " three"], StopParams(10, stop=["three", "two"]))
    assert request.output_text == " one "


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello wor", ["world"], 3),
        ("hello w", ["world", "xw"], 1),
        ("hello", ["world"], 0),
        ("aaa", ["aaab"], 3),
        ("abab", ["abac"], 2),
        ("x", ["ab" * 128], 0),
    ],
)
def test_held_back_is_longest_stop_prefix(text: str, stops: list[str], expected: int) -> None:
    request = Request("r", [1], SamplingParams(), StopParams(stop=stops), 10, sink=lambda _: None)
    request.output_text = text
    assert OutputProcessor._held_back(request) == expected
