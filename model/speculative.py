"""Speculative decoding: guess several next tokens cheaply, check them all in one forward pass.

At one stream a decode step reads every weight to produce a single token; the same pass can
score k guessed tokens at once (k + 1 positions), and every guess the model agrees with is a
token gained. Two ways to guess:

- prompt lookup (n-gram): find the latest earlier occurrence of the sequence's last n tokens
  (n from `max_ngram` down to `min_ngram`) and propose the k tokens that followed it. Free, and
  strong whenever the output repeats or quotes its context.
- a draft model: a smaller model of the same tokenizer proposes k tokens autoregressively.

Verification keeps the output distribution exactly that of the target model (the standard
speculative sampling rule): a guess d with draft probability q(d) is accepted with probability
min(1, p(d) / q(d)), where p is the target's distribution after the request's temperature and
filters; at the first rejection the token is drawn from the residual max(0, p - q),
renormalised; when every guess is accepted, one more token is drawn from p at the last position.
A prompt-lookup guess is a point mass (q(d) = 1). Greedy requests take the target's argmax at
every position, so they produce exactly the tokens of plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.sampling import SamplingState, argmax_rows, final_distribution_logits


@dataclass
class Verified:
    """What one verification kept: the accepted guesses, then one token of the target's own."""

    token_ids: list[int]
    num_accepted: int  # of the guesses (token_ids has num_accepted + 1 entries)


def propose_ngram(
    tokens: Sequence[int], num_tokens: int, max_ngram: int = 4, min_ngram: int = 1
) -> list[int]:
    """Up to `num_tokens` guesses: what followed an earlier match of the sequence's last n tokens.

    Longer matches first, and the latest match among them; the first match followed by
    `num_tokens` tokens wins, else the one followed by the most (the longer n on a tie).
    """
    length = len(tokens)
    best: list[int] = []
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = list(tokens[length - n :])
        for start in range(length - n - 1, -1, -1):
            if tokens[start] != tail[0] or list(tokens[start : start + n]) != tail:
                continue
            follow = list(tokens[start + n : start + n + num_tokens])
            if len(follow) == num_tokens:
                return follow
            if len(follow) > len(best):
                best = follow
    return best


def verify(
    logits: torch.Tensor,
    guesses: Sequence[int],
    state: SamplingState,
    draft_probs: torch.Tensor | None = None,
) -> Verified:
    """Check `guesses` against the target's logits at their positions.

    logits (k + 1, V): row i is the target's prediction after guess i (row 0: after the last
    real token). draft_probs (k, V), the draft model's distributions, or None for point-mass
    guesses. The request may not use penalties that change from token to token.
    """
    params = state.params
    num_guesses = len(guesses)
    if params.is_greedy:
        processed = _biased(logits, state)
        best = argmax_rows(processed).tolist()  # (k + 1,)
        accepted = 0
        while accepted < num_guesses and best[accepted] == guesses[accepted]:
            accepted += 1
        return Verified([*guesses[:accepted], best[accepted]], accepted)
    probs = torch.softmax(final_distribution_logits(_biased(logits, state), params), dim=-1)
    generator = state.generator
    uniforms = torch.rand(num_guesses + 1, generator=generator, device=logits.device).tolist()
    for i, guess in enumerate(guesses):
        p = float(probs[i, guess])
        q = 1.0 if draft_probs is None else float(draft_probs[i, guess])
        if q > 0 and uniforms[i] < min(1.0, p / q):
            continue
        # rejected: draw from the residual max(0, p - q), renormalised
        if draft_probs is None:
            residual = probs[i].clone()
            residual[guess] = 0.0
        else:
            residual = (probs[i] - draft_probs[i]).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # p and q equal up to rounding: p itself, then
            residual = probs[i]
        token = _draw_one(residual, generator)
        return Verified([*guesses[:i], token], i)
    return Verified([*guesses, _draw_one(probs[num_guesses], generator)], num_guesses)


def _biased(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """The logits with the request's logit bias (its only per-token adjustment here)."""
    processed = logits.float().clone()
    if state.bias_ids is not None and state.bias_values is not None:
        processed.index_add_(1, state.bias_ids, state.bias_values.expand(processed.shape[0], -1))
    return processed


def _draw_one(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to `weights` (V,)."""
    return int(torch.multinomial(weights / float(weights.sum()), 1, generator=generator))
