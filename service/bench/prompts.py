"""Distinct benchmark prompts of an exact length in GPT-2 tokens."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from model.tokenizer import Tokenizer

# A token that is a space and two or more ASCII letters is its own pre-token under GPT-2's split
# regex, so a run of such tokens decodes to text that encodes back to exactly the same ids.
_WORD_TOKEN = re.compile(rb" [A-Za-z]{2,}")


def word_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of ' word' tokens that survive a decode / encode round trip on their own."""
    ids = []
    for token_id in range(tokenizer.vocab_size):
        if token_id == tokenizer.eos_token_id:
            continue
        token = tokenizer.token_bytes(token_id)
        if _WORD_TOKEN.fullmatch(token) and tokenizer.encode(token.decode("ascii")) == [token_id]:
            ids.append(token_id)
    return ids


class PromptFactory:
    """Builds the prompt of request number `index`: random words, the same for the same seed."""

    def __init__(self, tokenizer: Tokenizer, num_tokens: int, seed: int = 0) -> None:
        if num_tokens < 1:
            raise ValueError(f"prompts need at least 1 token, got {num_tokens}")
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self.seed = seed
        self._word_ids: Sequence[int] = word_token_ids(tokenizer)
        if not self._word_ids:
            raise ValueError(f"tokenizer {tokenizer.name!r} has no ' word' tokens to build prompts")

    def token_ids(self, index: int) -> list[int]:
        """Exactly `num_tokens` ids; different indices give different prompts, which keeps a
        server's prefix cache from turning the benchmark into a cache benchmark."""
        rng = random.Random(self.seed * 1_000_003 + index)
        return rng.choices(self._word_ids, k=self.num_tokens)

    def text(self, index: int) -> str:
        """The same prompt as text; it encodes back to exactly `token_ids(index)`."""
        return self.tokenizer.decode(self.token_ids(index))
