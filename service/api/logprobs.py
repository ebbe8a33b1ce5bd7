"""Log-probabilities as each API shows them: this server's lists of entries, OpenAI's legacy
parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), and vLLM's
`prompt_logprobs`. JSON has no NaN or infinity: this server's shape turns both into null (a
processed log-probability of null means the request's filters cut the token off); OpenAI's
turns -inf into -9999.0, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from model.tokenizer import Tokenizer
from service.api.generation import finite_or_none, openai_logprob
from service.api.schemas import TokenLogprob, TopLogprob
from service.engine.request import PromptLogprob, TokenOutput, TopLogprobs


def _top_entries(tokenizer: Tokenizer, top: TopLogprobs | None) -> list[TopLogprob] | None:
    if top is None:
        return None
    entries = []
    processed = top.processed_logprobs
    for i, (token_id, logprob) in enumerate(zip(top.token_ids, top.logprobs, strict=True)):
        entry = TopLogprob(
            token_id=token_id, token=tokenizer.token_text(token_id), logprob=finite_or_none(logprob)
        )
        if processed is not None:
            entry.processed_logprob = finite_or_none(processed[i])
        if entry.logprob is not None:  # a processed top-N lists cut-off tokens last: drop them
            entries.append(entry)
    return entries


def token_logprobs(tokenizer: Tokenizer, tokens: Sequence[TokenOutput]) -> list[TokenLogprob]:
    """This server's entries for generated tokens."""
    entries = []
    for token in tokens:
        entry = TokenLogprob(
            token_id=token.token_id,
            token=tokenizer.token_text(token.token_id),
            logprob=finite_or_none(token.logprob),
            top_logprobs=_top_entries(tokenizer, token.top_logprobs),
        )
        if token.processed_logprob is not None:
            entry.processed_logprob = finite_or_none(token.processed_logprob)
        if token.processed_top_logprobs is not None:
            entry.processed_top_logprobs = _top_entries(tokenizer, token.processed_top_logprobs)
        entries.append(entry)
    return entries


def prompt_logprobs(tokenizer: Tokenizer, entries: Sequence[PromptLogprob]) -> list[TokenLogprob]:
    """This server's entries for prompt tokens (the first has logprob null)."""
    return [
        TokenLogprob(
            token_id=entry.token_id,
            token=tokenizer.token_text(entry.token_id),
            logprob=finite_or_none(entry.logprob),
            rank=entry.rank,
            top_logprobs=_top_entries(tokenizer, entry.top_logprobs),
        )
        for entry in entries
    ]


@dataclass
class LegacyLogprobs:
    """OpenAI's legacy completion logprobs: parallel lists, one entry per token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float | None] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(
        self,
        tokenizer: Tokenizer,
        token_id: int,
        logprob: float | None,
        top: TopLogprobs | None,
        offset: int,
        is_first_prompt_token: bool = False,
    ) -> int:
        """Append one token whose text starts at `offset`; returns where the next starts."""
        text = tokenizer.token_text(token_id)
        self.tokens.append(text)
        self.text_offset.append(offset)
        if is_first_prompt_token:  # nothing comes before it: no distribution to score it by
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return offset + len(text)
        value = openai_logprob(logprob)
        self.token_logprobs.append(value)
        alternatives: dict[str, float | None] = {}
        if top is not None:
            for alternative, alternative_logprob in zip(top.token_ids, top.logprobs, strict=True):
                if alternative_logprob == float("-inf"):
                    continue  # a processed top-N lists cut-off tokens last: drop them
                alternatives.setdefault(
                    tokenizer.token_text(alternative), openai_logprob(alternative_logprob)
                )
        alternatives.setdefault(text, value)  # the token itself is always listed (as vLLM)
        self.top_logprobs.append(alternatives)
        return offset + len(text)

    def add_prompt(
        self,
        tokenizer: Tokenizer,
        entries: Sequence[PromptLogprob],
        offset: int = 0,
        num_top: int | None = None,
    ) -> int:
        """Append the prompt's entries (with at most `num_top` alternatives each); returns the
        offset after the prompt."""
        for position, entry in enumerate(entries):
            offset = self.add(
                tokenizer,
                entry.token_id,
                entry.logprob,
                _at_most(entry.top_logprobs, num_top),
                offset,
                is_first_prompt_token=position == 0,
            )
        return offset

    def add_generated(
        self, tokenizer: Tokenizer, tokens: Sequence[TokenOutput], offset: int
    ) -> int:
        """Append generated tokens; offsets follow the text each token released."""
        for token in tokens:
            self.add(tokenizer, token.token_id, token.logprob, token.top_logprobs, offset)
            offset += len(token.text)
        return offset


def _at_most(top: TopLogprobs | None, num_top: int | None) -> TopLogprobs | None:
    """`top` cut to `num_top` alternatives (computed for the larger of two fields' asks)."""
    return top if top is None or num_top is None else top.first(num_top)


def vllm_prompt_logprobs(
    tokenizer: Tokenizer, entries: Sequence[PromptLogprob], num_top: int | None = None
) -> list[dict[str, dict[str, object]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else a map from token id
    to `{logprob, rank, decoded_token}` holding the token itself and its top alternatives (at
    most `num_top`)."""
    result: list[dict[str, dict[str, object]] | None] = []
    for position, entry in enumerate(entries):
        if position == 0:
            result.append(None)
            continue
        listing: dict[str, dict[str, object]] = {}
        top = _at_most(entry.top_logprobs, num_top)
        if top is not None:
            for rank, (token_id, logprob) in enumerate(
                zip(top.token_ids, top.logprobs, strict=True), 1
            ):
                listing[str(token_id)] = {
                    "logprob": openai_logprob(logprob),
                    "rank": rank,
                    "decoded_token": tokenizer.token_text(token_id),
                }
        listing.setdefault(
            str(entry.token_id),
            {
                "logprob": openai_logprob(entry.logprob),
                "rank": entry.rank,
                "decoded_token": tokenizer.token_text(entry.token_id),
            },
        )
        result.append(listing)
    return result
