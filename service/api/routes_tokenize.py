"""Text to token ids and back, with the served model's tokenizer."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.dependencies import StateDep
from service.api.errors import invalid_request
from service.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: StateDep) -> TokenizeResponse:
    """Encode `prompt` into token ids, as the generation routes would ('<|endoftext|>' is the
    end-of-text token)."""
    tokens = state.tokenizer.encode_prompt(body.prompt)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=state.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: StateDep) -> DetokenizeResponse:
    """Decode token ids into text (invalid UTF-8 becomes U+FFFD)."""
    vocab_size = state.tokenizer.vocab_size
    for token_id in body.tokens:
        if not 0 <= token_id < vocab_size:
            raise invalid_request(
                f"token id {token_id} is outside the vocabulary [0, {vocab_size})", "tokens"
            )
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
