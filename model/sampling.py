"""Batched next-token sampling: one step for B requests, each with its own settings.

Per row, in order (as in vLLM): logit bias -> repetition, presence and frequency penalties ->
greedy rows take the argmax -> temperature -> top-k -> top-p -> min-p -> random draw. The draw
uses the exponential race (argmax of probs / q, q ~ Exponential(1)), with q drawn per seeded row
from that row's own generator in a batch-independent shape, so a seeded request gets the same
tokens whatever else shares its batch.

What a request needs across steps (its generator, its logit bias as index tensors, its token
counts for the penalties) lives in a `SamplingState` built once per request, so a step costs the
same whatever the size of a request's bias or prompt. Log-probabilities are computed only for
the rows that ask for them: under the model's raw softmax, under the distribution the token was
drawn from ("processed"), or both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from model.native_decode import native_argmax
from model.sampling_params import SamplingParams

# A cumulative probability within this of top_p counts as reaching it, so float32 rounding in
# the cumulative sum does not add a token at an exact boundary (probs [0.5, 0.3, ...], p=0.8).
TOP_P_TOLERANCE = 1e-6
# How many of the most likely tokens top-p looks at before it falls back to a full sort.
TOP_P_CANDIDATES = 1024


# argmax over a long row runs as an amax over blocks of this many, then an argmax in one block:
# torch's CPU argmax is not vectorised (17 ms for 256 x 50,257 floats; this way 2 ms).
ARGMAX_BLOCK = 1024


# Up to this many rows a CPU argmax runs compiled (model.native_decode.native_argmax): one
# pass, where torch's handful of ops each start cold after a decode step; from more rows, the
# blocked torch path below (spread over the threads) is faster.
NATIVE_ARGMAX_MAX_ROWS = 4


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` for [R, V] (ties: the lowest index), fast on long rows."""
    rows, vocab = x.shape
    if rows <= NATIVE_ARGMAX_MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
        chosen = native_argmax(x) if vocab else None
        if chosen is not None:
            return chosen
    if vocab < 4 * ARGMAX_BLOCK or x.device.type != "cpu":
        return x.argmax(dim=-1)
    full = vocab // ARGMAX_BLOCK * ARGMAX_BLOCK
    block_max = x[:, :full].reshape(rows, -1, ARGMAX_BLOCK).amax(dim=-1)  # [R, V // block]
    best_block = block_max.argmax(dim=-1)  # the first block that holds the row's maximum
    best = block_max.gather(1, best_block[:, None]).squeeze(1)
    starts = best_block * ARGMAX_BLOCK
    columns = starts[:, None] + torch.arange(ARGMAX_BLOCK, device=x.device)[None, :]
    result = starts + x.gather(1, columns).argmax(dim=-1)
    if full < vocab:  # the tail past the last whole block wins only if strictly larger
        tail_max, tail_index = x[:, full:].max(dim=-1)
        result = torch.where(tail_max > best, full + tail_index, result)
    return result


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Create the generator a seeded request keeps for its whole life."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(eq=False)
class SamplingState:
    """One request's sampling settings and what they need between steps, built once.

    `record(token)` must be called with every token the request generates, in order.
    """

    params: SamplingParams
    vocab_size: int
    generator: torch.Generator | None = None
    bias_ids: torch.Tensor | None = None  # [E] int64, the logit bias as tensors
    bias_values: torch.Tensor | None = None  # [E] float32
    prompt_mask: torch.Tensor | None = None  # [V] bool: in the prompt (repetition penalty)
    output_counts: torch.Tensor | None = None  # [V] float32: times generated (penalties)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        vocab_size: int,
        prompt_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> SamplingState:
        """Validate the request against the vocabulary and build its tensors."""
        params.validate_for_vocab(vocab_size)
        state = cls(params, vocab_size)
        if params.seed is not None:
            state.generator = make_generator(params.seed, device)
        if params.logit_bias:
            state.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
            state.bias_values = torch.tensor(
                list(params.logit_bias.values()), dtype=torch.float32, device=device
            )
        if params.repetition_penalty != 1.0:
            _check_token_ids(prompt_token_ids, vocab_size)
            state.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_token_ids:
                ids = torch.tensor(list(prompt_token_ids), dtype=torch.long, device=device)
                state.prompt_mask[ids] = True
        if params.uses_penalties:
            state.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        return state

    def record(self, token_id: int) -> None:
        """Count a generated token (for the penalties)."""
        if self.output_counts is not None:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token ids for penalties must lie in [0, {self.vocab_size})")
            self.output_counts[token_id] += 1


def new_states(
    params: Sequence[SamplingParams],
    vocab_size: int,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
) -> list[SamplingState]:
    """States for a batch of fresh rows, with tokens already generated recorded (for tests)."""
    states = []
    for row, row_params in enumerate(params):
        prompt = prompt_token_ids[row] if prompt_token_ids is not None else ()
        state = SamplingState.create(row_params, vocab_size, prompt)
        for token in output_token_ids[row] if output_token_ids is not None else ():
            state.record(token)
        states.append(state)
    return states


@dataclass
class SamplerOutput:
    """The tokens picked in one step and, for the rows that asked, their log-probabilities.

    Raw log-probabilities come from log_softmax of the input logits; processed ones from the
    distribution each token was drawn from (greedy rows: bias and penalties, then the top-k /
    top-p / min-p cuts, at temperature 1). Rows that did not ask hold NaN, and their top entries
    are meaningless. Top-N tensors have N = the most alternatives any row asked for; a cut-off
    candidate's processed log-probability is -inf.
    """

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, raw, at token_ids
    top_token_ids: torch.Tensor | None = None  # [B, N] int64, raw top-N, descending
    top_logprobs: torch.Tensor | None = None  # [B, N] float32
    processed_logprobs: torch.Tensor | None = None  # [B] float32, processed, at token_ids
    processed_top_token_ids: torch.Tensor | None = None  # [B, N] processed top-N
    processed_top_logprobs: torch.Tensor | None = None  # [B, N]
    processed_at_raw_top: torch.Tensor | None = None  # [B, N] processed, at top_token_ids


def sample(
    logits: torch.Tensor,
    states: Sequence[SamplingState],
    is_owned: bool = False,
    bans: Mapping[int, Sequence[int]] | None = None,
) -> SamplerOutput:
    """Pick the next token for each row of `logits` [B, V] under that row's own settings.

    With `is_owned`, the caller gives `logits` away (float32): it may be changed in place, which
    saves a copy of the whole batch when some row has a bias or penalties. `bans` maps rows to
    token ids they may not pick this step (min_tokens); raw log-probabilities ignore them.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [batch, vocab] tensor, got {logits.shape}")
    if len(states) != logits.shape[0]:
        raise ValueError(f"{len(states)} sampling states for a batch of {logits.shape[0]} rows")
    params = [state.params for state in states]
    raw = logits.float()
    # Raw log-probabilities come first, from the logits as the model gave them.
    raw_rows = [row for row, p in enumerate(params) if p.wants_raw_logprobs]
    raw_logprobs = torch.log_softmax(_select(raw, raw_rows), dim=-1) if raw_rows else None
    processed = process_logits(raw, states, in_place=is_owned or raw is not logits)
    if bans:
        if processed is logits and not is_owned:
            processed = processed.clone()
        for row, banned in bans.items():
            processed[row, list(banned)] = float("-inf")
    sample_rows = [row for row, row_params in enumerate(params) if not row_params.is_greedy]
    final: torch.Tensor | None = None  # [S, V] the sampled rows' logits after every stage
    can_overwrite = processed is not logits or is_owned
    if len(sample_rows) == len(params):
        final = _final_logits(processed, params, is_owned=can_overwrite)
        token_ids = _draw(final, [state.generator for state in states])
    else:
        token_ids = argmax_rows(processed)  # ties go to the lowest id
        if sample_rows:
            index = torch.tensor(sample_rows, device=logits.device)
            final = _final_logits(processed[index], [params[r] for r in sample_rows], True)
            token_ids[index] = _draw(final, [states[r].generator for r in sample_rows])
    out = SamplerOutput(token_ids)
    num_top = min(max((p.num_logprobs for p in params), default=0), raw.shape[1])
    if raw_logprobs is not None:
        _add_raw_logprobs(out, raw_logprobs, raw_rows, num_top)
    processed_rows = [row for row, p in enumerate(params) if p.wants_processed_logprobs]
    if processed_rows:
        _add_processed_logprobs(out, processed, final, sample_rows, params, processed_rows, num_top)
    return out


def _select(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`tensor[rows]`, without a copy when `rows` is every row in order."""
    if len(rows) == tensor.shape[0]:
        return tensor
    return tensor[torch.tensor(rows, device=tensor.device)]


def _scatter_rows(num_rows: int, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """A [B, ...] tensor holding `values` at `rows` and NaN (or -1 for ids) elsewhere."""
    if len(rows) == num_rows:
        return values
    fill = -1 if not values.is_floating_point() else math.nan
    full = torch.full((num_rows, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    full[torch.tensor(rows, device=values.device)] = values
    return full


def _add_raw_logprobs(
    out: SamplerOutput, logprobs: torch.Tensor, rows: list[int], num_top: int
) -> None:
    """Raw log-probabilities of the chosen tokens and the top-N, from the rows' [R, V]."""
    num_rows = out.token_ids.shape[0]
    chosen = logprobs.gather(1, _select(out.token_ids, rows).unsqueeze(1)).squeeze(1)
    out.logprobs = _scatter_rows(num_rows, rows, chosen)
    if num_top:
        values, ids = logprobs.topk(num_top, dim=-1)  # [R, N], descending
        out.top_token_ids = _scatter_rows(num_rows, rows, ids)
        out.top_logprobs = _scatter_rows(num_rows, rows, values)


def _add_processed_logprobs(
    out: SamplerOutput,
    processed: torch.Tensor,
    final: torch.Tensor | None,
    sample_rows: list[int],
    params: Sequence[SamplingParams],
    rows: list[int],
    num_top: int,
) -> None:
    """The distribution each row drew from: the sampled rows' `final` logits, and the greedy
    rows' processed logits cut by their filters at temperature 1."""
    num_rows = processed.shape[0]
    position = {row: i for i, row in enumerate(sample_rows)}
    parts = []
    for row in rows:
        if row in position and final is not None:
            parts.append(final[position[row]])
        else:
            parts.append(truncate_logits(processed[row : row + 1], [params[row]])[0])
    logprobs = torch.log_softmax(torch.stack(parts), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, _select(out.token_ids, rows).unsqueeze(1)).squeeze(1)
    out.processed_logprobs = _scatter_rows(num_rows, rows, chosen)
    if not num_top:
        return
    values, ids = logprobs.topk(num_top, dim=-1)
    out.processed_top_token_ids = _scatter_rows(num_rows, rows, ids)
    out.processed_top_logprobs = _scatter_rows(num_rows, rows, values)
    if out.top_token_ids is not None:
        raw_top = _select(out.top_token_ids, rows).clamp_min(0)  # -1: a row without raw ones
        out.processed_at_raw_top = _scatter_rows(num_rows, rows, logprobs.gather(1, raw_top))


def process_logits(
    logits: torch.Tensor, states: Sequence[SamplingState], in_place: bool = False
) -> torch.Tensor:
    """Apply each row's logit bias, then its repetition, presence and frequency penalties.

    Returns float32 [B, V]: `logits` itself when no row has anything to apply or when
    `in_place`, else a new tensor. Repetition penalty covers prompt and output tokens (positive
    logits divided by it, negative ones multiplied); presence and frequency penalties (OpenAI)
    cover output tokens only.
    """
    processed = logits.float()
    bias_rows = [row for row, s in enumerate(states) if s.bias_ids is not None]
    penalty_rows = [row for row, s in enumerate(states) if s.output_counts is not None]
    if not (bias_rows or penalty_rows):
        return processed
    if processed is logits and not in_place:
        processed = processed.clone()
    for row in bias_rows:
        state = states[row]
        assert state.bias_ids is not None and state.bias_values is not None
        processed[row].index_add_(0, state.bias_ids, state.bias_values)
    if penalty_rows:
        index = torch.tensor(penalty_rows, device=processed.device)
        values = processed[index]  # [R, V]
        counts = torch.stack([states[row].output_counts for row in penalty_rows])  # type: ignore[misc]
        params = [states[row].params for row in penalty_rows]
        device = processed.device
        repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = counts > 0
            for i, row in enumerate(penalty_rows):
                mask = states[row].prompt_mask
                if mask is not None:
                    seen[i] |= mask
            penalised = torch.where(values > 0, values / repetition, values * repetition)
            values = torch.where(seen, penalised, values)
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            values = values - (frequency * counts + presence * (counts > 0))
        processed[index] = values
    return processed


def _final_logits(
    logits: torch.Tensor, params: Sequence[SamplingParams], is_owned: bool
) -> torch.Tensor:
    """The sampled rows' logits after temperature and the top-k / top-p / min-p cuts [S, V]."""
    temperatures = [p.temperature for p in params]
    if any(temperature != 1.0 for temperature in temperatures):
        temperature = torch.tensor(temperatures, device=logits.device).unsqueeze(1)
        logits = logits / temperature  # a new tensor
    elif not is_owned and any(p.uses_truncation for p in params):
        logits = logits.clone()
    _truncate_in_place(logits, params)
    return logits


def final_distribution_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows [R, V] of one request after its temperature and top-k / top-p / min-p cuts: the
    logits of the distribution it samples from (greedy: the cuts at temperature 1). May be
    `logits` itself when nothing changes it."""
    if params.is_greedy:
        cut = logits.clone() if params.uses_truncation else logits
        _truncate_in_place(cut, [params] * logits.shape[0])
        return cut
    return _final_logits(logits, [params] * logits.shape[0], is_owned=False)


def _draw(final: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token id per row of the final logits [S, V]; returns [S] int64."""
    probs = final.softmax(dim=-1)
    noise = _exponential_noise(probs.shape[0], probs.shape[1], generators, probs.device)
    return argmax_rows(probs.div_(noise))


def truncate_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Return a copy of `logits` [B, V] with what each row's top-k, top-p and min-p drop at -inf."""
    truncated = logits.float().clone()
    _truncate_in_place(truncated, params)
    return truncated


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


def _check_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        raise ValueError(f"token ids for penalties must lie in [0, {vocab_size})")
