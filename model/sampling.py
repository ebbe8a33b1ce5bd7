"""Batched next-token sampling: one decode step for B requests, each with its own settings.

Per row, in order (as in vLLM): logit bias -> repetition, presence and frequency penalties ->
greedy rows take the argmax -> temperature -> top-k -> top-p -> min-p -> random draw. The draw
uses the exponential race (argmax of probs / q, q ~ Exponential(1)), with q drawn per seeded row
from that row's own generator in a batch-independent shape, so a seeded request gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from model.sampling_params import SamplingParams

# A cumulative probability within this of top_p counts as reaching it, so float32 rounding in
# the cumulative sum does not add a token at an exact boundary (probs [0.5, 0.3, ...], p=0.8).
TOP_P_TOLERANCE = 1e-6
# How many of the most likely tokens top-p looks at before it falls back to a full sort.
TOP_P_CANDIDATES = 1024


@dataclass
class SamplerOutput:
    """The tokens picked in one decode step, with log-probabilities under the raw model."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, log_softmax of the input logits at token_ids
    top_token_ids: torch.Tensor | None  # [B, N] int64, N = most logprobs any row asked for
    top_logprobs: torch.Tensor | None  # [B, N] float32, sorted descending


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Create the generator a seeded request keeps for its whole life and passes to `sample`."""
    return torch.Generator(device=device).manual_seed(seed)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
) -> SamplerOutput:
    """Pick the next token for each row of `logits` [B, V] under that row's own parameters."""
    _check_batch(logits, params, generators, output_token_ids, prompt_token_ids)
    batch_size = logits.shape[0]
    # `raw` is `logits` itself when that is already float32; neither is ever written to, since
    # the log-probabilities below are taken from the unprocessed distribution.
    raw = logits.float()
    processed = process_logits(raw, params, output_token_ids, prompt_token_ids)
    sample_rows = [row for row, row_params in enumerate(params) if not row_params.is_greedy]
    if len(sample_rows) == batch_size:
        token_ids = _draw(processed, params, generators, is_owned=processed is not raw)
    else:
        token_ids = processed.argmax(dim=-1)  # ties go to the lowest id
        if sample_rows:
            index = torch.tensor(sample_rows, device=logits.device)
            token_ids[index] = _draw(
                processed[index],  # a copy
                [params[row] for row in sample_rows],
                [generators[row] for row in sample_rows],
                is_owned=True,
            )

    log_normalizer = torch.logsumexp(raw, dim=-1, keepdim=True)  # [B, 1]
    chosen_logprobs = (raw.gather(1, token_ids.unsqueeze(1)) - log_normalizer).squeeze(1)
    num_top = min(max((p.num_logprobs for p in params), default=0), raw.shape[1])
    if num_top == 0:
        return SamplerOutput(token_ids, chosen_logprobs, None, None)
    top_values, top_token_ids = raw.topk(num_top, dim=-1)  # [B, N], sorted descending
    return SamplerOutput(token_ids, chosen_logprobs, top_token_ids, top_values - log_normalizer)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Apply each row's logit bias, then its repetition, presence and frequency penalties.

    Returns float32 [B, V]: a new tensor, or `logits` itself when no row has anything to apply.
    Repetition penalty covers prompt and output tokens (positive logits divided by it, negative
    ones multiplied); presence and frequency penalties (OpenAI) cover output tokens only.
    """
    processed = logits.float()
    vocab_size, device = processed.shape[1], processed.device
    bias_rows = [row for row, p in enumerate(params) if p.logit_bias]
    repetition_rows = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    additive_rows = [
        row for row, p in enumerate(params) if p.presence_penalty or p.frequency_penalty
    ]
    if not (bias_rows or repetition_rows or additive_rows):
        return processed
    if processed is logits:
        processed = processed.clone()

    # Only the touched (row, token) entries are gathered and written back: no dense [B, V] masks.
    bias_entries: list[tuple[int, int, float]] = []
    for row in bias_rows:
        params[row].validate_for_vocab(vocab_size)
        row_bias = params[row].logit_bias or {}
        bias_entries.extend((row, token, bias) for token, bias in row_bias.items())
    _add_at(processed, bias_entries)

    rows: list[int] = []
    tokens: list[int] = []
    for row in repetition_rows:
        seen = set(output_token_ids[row])
        if prompt_token_ids is not None:
            seen.update(prompt_token_ids[row])
        _check_token_ids(seen, vocab_size)
        rows.extend([row] * len(seen))
        tokens.extend(seen)
    if rows:
        index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
        penalties = torch.tensor([params[row].repetition_penalty for row in rows], device=device)
        values = processed[index]
        processed[index] = torch.where(values > 0, values / penalties, values * penalties)

    additive_entries: list[tuple[int, int, float]] = []
    for row in additive_rows:
        counts = Counter(output_token_ids[row])
        _check_token_ids(counts, vocab_size)
        presence, frequency = params[row].presence_penalty, params[row].frequency_penalty
        additive_entries.extend(
            (row, token, -(frequency * count + presence)) for token, count in counts.items()
        )
    _add_at(processed, additive_entries)
    return processed


def truncate_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Return a copy of `logits` [B, V] with what each row's top-k, top-p and min-p drop at -inf."""
    truncated = logits.float().clone()
    _truncate_in_place(truncated, params)
    return truncated


def _draw(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    is_owned: bool,
) -> torch.Tensor:
    """Draw one token id per row of `logits` [S, V], none of them greedy; returns [S] int64."""
    temperatures = [p.temperature for p in params]
    if any(temperature != 1.0 for temperature in temperatures):
        temperature = torch.tensor(temperatures, device=logits.device).unsqueeze(1)
        logits = logits / temperature  # a new tensor
    elif not is_owned and any(p.uses_truncation for p in params):
        logits = logits.clone()
    _truncate_in_place(logits, params)
    probs = logits.softmax(dim=-1)
    noise = _exponential_noise(probs.shape[0], probs.shape[1], generators, probs.device)
    return probs.div_(noise).argmax(dim=-1)


def _truncate_in_place(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Set to -inf, row by row, the tokens that top-k, then top-p, then min-p exclude."""
    vocab_size = logits.shape[1]
    top_k_rows = [row for row, p in enumerate(params) if 0 < p.top_k < vocab_size]
    top_p_rows = [row for row, p in enumerate(params) if p.top_p < 1.0]
    min_p_rows = [row for row, p in enumerate(params) if p.min_p > 0.0]
    if top_k_rows:
        top_ks = [params[row].top_k for row in top_k_rows]
        _update_rows(logits, top_k_rows, lambda subset: _keep_top_k(subset, top_ks))
    if top_p_rows:
        top_ps = [params[row].top_p for row in top_p_rows]
        # Rows already cut to their top k need look no further than k candidates.
        top_p_ks = [params[row].top_k for row in top_p_rows]
        width = TOP_P_CANDIDATES
        if all(0 < k <= TOP_P_CANDIDATES for k in top_p_ks):
            width = max(top_p_ks)
        _update_rows(logits, top_p_rows, lambda subset: _keep_top_p(subset, top_ps, width))
    if min_p_rows:
        min_ps = [params[row].min_p for row in min_p_rows]
        _update_rows(logits, min_p_rows, lambda subset: _keep_min_p(subset, min_ps))


def _update_rows(
    logits: torch.Tensor, rows: list[int], update: Callable[[torch.Tensor], None]
) -> None:
    """Run the in-place `update` on logits[rows], without a gather when that is every row."""
    if len(rows) == logits.shape[0]:
        update(logits)
        return
    index = torch.tensor(rows, device=logits.device)
    subset = logits[index]  # [R, V], a copy
    update(subset)
    logits[index] = subset


def _keep_top_k(logits: torch.Tensor, top_ks: list[int]) -> None:
    """Keep each row's k largest logits (ties with the k-th are kept too)."""
    k = torch.tensor(top_ks, device=logits.device).unsqueeze(1)  # [R, 1]
    kth_largest = logits.topk(max(top_ks), dim=-1).values.gather(1, k - 1)  # [R, 1]
    logits.masked_fill_(logits < kth_largest, -math.inf)


def _keep_top_p(logits: torch.Tensor, top_ps: list[float], width: int) -> None:
    """Keep each row's smallest set of most likely tokens whose probability reaches p."""
    vocab_size = logits.shape[1]
    p = torch.tensor(top_ps, device=logits.device).unsqueeze(1) - TOP_P_TOLERANCE  # [R, 1]
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)  # [R, 1]
    # The nucleus usually lies among the `width` most likely tokens: look there first and sort
    # the whole row only where it does not. Both give the same cutoff.
    width = min(width, vocab_size)
    candidates = logits.topk(width, dim=-1).values  # [R, W], descending
    smallest_kept, num_keep = _nucleus_cutoff(candidates, log_normalizer, p)
    if width < vocab_size:
        wider = (num_keep > width).squeeze(1).nonzero().squeeze(1)
        if wider.numel():
            sorted_logits = logits[wider].sort(dim=-1, descending=True).values  # [R', V]
            wider_cutoff, _ = _nucleus_cutoff(sorted_logits, log_normalizer[wider], p[wider])
            smallest_kept[wider] = wider_cutoff
    logits.masked_fill_(logits < smallest_kept, -math.inf)


def _nucleus_cutoff(
    sorted_logits: torch.Tensor, log_normalizer: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest logit kept by top-p [R, 1] and nucleus size [R, 1], from descending logits.

    The size is one more than the width of `sorted_logits` when they do not hold mass p.
    """
    cumulative = (sorted_logits - log_normalizer).exp().cumsum(dim=-1)  # [R, W]
    # token j is kept while the mass ranked before it is below p: one more than those below p
    num_keep = (cumulative < p).sum(dim=-1, keepdim=True) + 1
    smallest_kept = sorted_logits.gather(1, num_keep.clamp_max(sorted_logits.shape[1]) - 1)
    return smallest_kept, num_keep


def _keep_min_p(logits: torch.Tensor, min_ps: list[float]) -> None:
    """Drop tokens whose probability is below min_p times the row's largest probability."""
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p), with no softmax needed
    log_min_p = torch.tensor([math.log(p) for p in min_ps], device=logits.device).unsqueeze(1)
    threshold = logits.max(dim=-1, keepdim=True).values + log_min_p  # [R, 1]
    logits.masked_fill_(logits < threshold, -math.inf)


def _exponential_noise(
    num_rows: int,
    vocab_size: int,
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> torch.Tensor:
    """Exponential(1) noise [S, V]: seeded rows from their own generator, the rest shared."""
    # -log(u) with u ~ Uniform[0, 1) is Exponential(1), and several times faster on CPU than
    # Tensor.exponential_. Both ends are clamped so q is finite and positive: probs / q must
    # never be inf or nan.
    uniform = torch.empty(num_rows, vocab_size, device=device)
    if any(generator is None for generator in generators):
        uniform.uniform_()
    for row, generator in enumerate(generators):
        if generator is not None:
            # A fresh [V] draw, so the values depend on nothing but this row's generator.
            draw = torch.empty(vocab_size, device=generator.device)
            uniform[row] = draw.uniform_(generator=generator)
    tiny = torch.finfo(uniform.dtype).tiny
    return uniform.clamp_min_(tiny).log_().neg_().clamp_min_(tiny)


def _add_at(logits: torch.Tensor, entries: list[tuple[int, int, float]]) -> None:
    """Add each (row, token, delta) to `logits` in place; no (row, token) appears twice."""
    if not entries:
        return
    rows, tokens, deltas = zip(*entries, strict=True)
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
    logits[index] += torch.tensor(deltas, device=device)


def _check_token_ids(token_ids: Collection[int], vocab_size: int) -> None:
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        raise ValueError(f"token ids for penalties must lie in [0, {vocab_size})")


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]] | None,
) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [batch, vocab] tensor, got {logits.shape}")
    batch_size = logits.shape[0]
    per_row_args = {
        "params": params,
        "generators": generators,
        "output_token_ids": output_token_ids,
    }
    if prompt_token_ids is not None:
        per_row_args["prompt_token_ids"] = prompt_token_ids
    for name, per_row in per_row_args.items():
        if len(per_row) != batch_size:
            raise ValueError(f"{name} has {len(per_row)} entries for a batch of {batch_size} rows")
