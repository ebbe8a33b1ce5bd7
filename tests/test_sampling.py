"""Tests for batched sampling: parameter validation, each logits stage, and the draw itself."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from model import sampling
from model.sampling import make_generator, new_states, truncate_logits
from model.sampling_params import SamplingParams, SamplingParamsError


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    outputs: list[list[int]],
    prompts: list[list[int]] | None = None,
) -> sampling.SamplerOutput:
    """One step of fresh rows, each with the given generator and tokens already generated."""
    states = new_states(params, logits.shape[1], outputs, prompts)
    for state, generator in zip(states, generators, strict=True):
        state.generator = generator
    return sampling.sample(logits, states)


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    outputs: list[list[int]],
    prompts: list[list[int]] | None = None,
) -> torch.Tensor:
    return sampling.process_logits(logits, new_states(params, logits.shape[1], outputs, prompts))


def logits_for(probs: list[float]) -> torch.Tensor:
    """A [1, V] logits row whose softmax is `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)


def draw_many(logits_row: torch.Tensor, params: SamplingParams, num_draws: int) -> torch.Tensor:
    """Sample `num_draws` independent tokens from one logits row [1, V], in one batched call."""
    batch = logits_row.expand(num_draws, -1)
    out = sample(batch, [params] * num_draws, [None] * num_draws, [[]] * num_draws)
    return out.token_ids


def kept_ids(truncated: torch.Tensor) -> set[int]:
    return set(torch.nonzero(truncated[0] > -math.inf).flatten().tolist())


def test_greedy_matches_argmax() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    logits[5, 7] = logits[5, 3] = logits[5].max() + 1.0  # a tie: the lowest id wins
    params = [SamplingParams(temperature=0.0)] * 6
    out = sample(logits, params, [None] * 6, [[]] * 6)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids[5].item() == 3
    assert out.token_ids.dtype == torch.int64
    assert out.top_token_ids is None and out.top_logprobs is None


INVALID_PARAMS = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 100.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "1.0"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": None}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"presence_penalty": 2.1}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": {True: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"),
    ({"logit_bias": [(5, 1.0)]}, "logit_bias"),
    ({"seed": 1.5}, "seed"),
    ({"seed": False}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": 2.0}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize(("kwargs", "param"), INVALID_PARAMS)
def test_reject_invalid_params(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(SamplingParamsError) as excinfo:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert excinfo.value.param == param
    assert param in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 100},
        {"top_k": -1},
        {"top_k": 1},
        {"top_p": 1e-9},
        {"top_p": 1},
        {"min_p": 0},
        {"min_p": 1.0},
        {"repetition_penalty": 0.01},
        {"presence_penalty": -2.0, "frequency_penalty": 2},
        {"logit_bias": {0: -100, 50256: 100.0}},
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"logprobs": 0},
        {"logprobs": 20},
    ],
)
def test_accept_boundary_params(kwargs: dict[str, object]) -> None:
    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_normalise_params() -> None:
    bias: dict[int, float] = {3: 1}
    params = SamplingParams(temperature=1, top_p=1, logit_bias=bias)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    bias[4] = 2.0  # the caller's dict is copied, so later edits do not leak in
    assert dict(params.logit_bias or {}) == {3: 1.0}
    assert hash(params) == hash(SamplingParams(temperature=1, top_p=1, logit_bias={3: 1}))
    assert copy.deepcopy(params) == params
    assert pickle.loads(pickle.dumps(params)) == params
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_reject_logit_bias_outside_vocab() -> None:
    params = SamplingParams(logit_bias={9: 1.0})
    params.validate_for_vocab(10)
    with pytest.raises(SamplingParamsError) as excinfo:
        params.validate_for_vocab(9)
    assert excinfo.value.param == "logit_bias"
    with pytest.raises(SamplingParamsError):
        sample(torch.zeros(1, 9), [params], [None], [[]])


def test_reject_mismatched_batch() -> None:
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="sampling states"):
        sampling.sample(logits, new_states([SamplingParams()], 5))
    with pytest.raises(ValueError, match="logits"):
        sampling.sample(torch.zeros(5), new_states([SamplingParams()], 5))


def test_keep_only_top_k_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 0.3
    top_five = set(logits[0].argsort(descending=True)[:5].tolist())
    seen = set(draw_many(logits, SamplingParams(top_k=5), 4000).tolist())
    assert seen == top_five
    only_best = draw_many(logits, SamplingParams(top_k=1, temperature=5.0), 500)
    assert set(only_best.tolist()) == {int(logits.argmax())}


NUCLEUS_CASES = [
    ([0.5, 0.3, 0.15, 0.05], 0.8, {0, 1}),
    ([0.5, 0.3, 0.15, 0.05], 0.81, {0, 1, 2}),
    ([0.5, 0.3, 0.15, 0.05], 0.5, {0}),
    ([0.5, 0.3, 0.15, 0.05], 0.2, {0}),
    ([0.5, 0.3, 0.15, 0.05], 0.96, {0, 1, 2, 3}),
    # float32 softmax puts these cumulative sums just below p: the boundary must still count
    ([0.85, 0.1, 0.025, 0.025], 0.85, {0}),
    ([0.85, 0.1, 0.025, 0.025], 0.95, {0, 1}),
]


@pytest.mark.parametrize(("ranked_probs", "top_p", "expected_ranks"), NUCLEUS_CASES)
def test_keep_exact_nucleus(
    ranked_probs: list[float], top_p: float, expected_ranks: set[int]
) -> None:
    torch.manual_seed(0)
    # token ids are shuffled against the probabilities so no result can come from id order
    order = [2, 0, 3, 1]
    probs = [0.0] * 4
    for rank, prob in enumerate(ranked_probs):
        probs[order[rank]] = prob
    expected_ids = {order[rank] for rank in expected_ranks}
    logits = logits_for(probs)
    params = SamplingParams(top_p=top_p)
    assert kept_ids(truncate_logits(logits, [params])) == expected_ids
    assert set(draw_many(logits, params, 3000).tolist()) == expected_ids


def test_apply_top_p_to_renormalised_top_k() -> None:
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    # after top-k=3 the probabilities are 4/9, 3/9, 2/9: 4/9 + 3/9 reaches 0.75, so 2 is dropped
    # (top-p on the original distribution would have kept it: 0.4 + 0.3 < 0.75)
    both = SamplingParams(top_k=3, top_p=0.75)
    assert kept_ids(truncate_logits(logits, [both])) == {0, 1}
    # in one batch, each row is truncated by its own settings
    batch = truncate_logits(logits.expand(2, -1), [both, SamplingParams(top_p=0.75)])
    assert kept_ids(batch[:1]) == {0, 1}
    assert kept_ids(batch[1:]) == {0, 1, 2}


def nucleus_size(logits_row: torch.Tensor, top_p: float) -> int:
    """Size of the smallest set of most likely tokens holding mass top_p, in float64."""
    probs = torch.softmax(logits_row.double(), dim=-1).sort(descending=True).values
    return int((probs.cumsum(dim=-1) < top_p).sum()) + 1


def test_keep_nucleus_wider_than_candidate_window() -> None:
    # a flat row's nucleus holds thousands of tokens, more than top-p first looks at; a peaked
    # row's holds a few. Both must match a float64 computation, alone and side by side.
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6000, generator=generator) * torch.tensor([[0.2], [4.0]])
    params = [SamplingParams(top_p=0.7), SamplingParams(top_p=0.9)]
    expected = [nucleus_size(logits[row], params[row].top_p) for row in range(2)]
    assert expected[0] > 2000 and expected[1] < 200
    batch = truncate_logits(logits, params)
    for row in range(2):
        alone = truncate_logits(logits[row : row + 1], params[row : row + 1])
        assert torch.equal(alone[0], batch[row])
        assert int((batch[row] > -math.inf).sum()) == expected[row]


@pytest.mark.parametrize(("min_p", "expected"), [(0.3, {0, 1, 2}), (0.5, {0, 1}), (1.0, {0})])
def test_drop_tokens_below_min_p(min_p: float, expected: set[int]) -> None:
    torch.manual_seed(0)
    logits = logits_for([0.4, 0.3, 0.15, 0.1, 0.05])  # thresholds 0.12, 0.2, 0.4
    params = SamplingParams(min_p=min_p)
    assert kept_ids(truncate_logits(logits, [params])) == expected
    assert set(draw_many(logits, params, 3000).tolist()) == expected


def test_apply_penalties() -> None:
    logits = torch.tensor(
        [
            [1.0, 2.0, -1.0, 3.0, -0.5, 0.5],
            [1.0, 2.0, -1.0, 3.0, -0.5, 0.5],
            [1.0, 2.0, -1.0, 3.0, -0.5, 0.5],
            [-1.0, 2.0, -1.0, 3.0, -0.5, 0.5],
            [1.0, 2.0, -1.0, 3.0, -0.5, 0.5],
        ]
    )
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
        SamplingParams(repetition_penalty=2.0, logit_bias={0: 2.0, 4: -100.0}),
        SamplingParams(presence_penalty=-1.0),
    ]
    outputs = [[2, 2], [3, 3, 3, 4], [1, 2], [0], [5, 5]]
    prompts = [[1], [5], [0], [], [3]]
    processed = process_logits(logits, params, outputs, prompts)
    expected = logits.clone()
    expected[0, 1] = 2.0 / 2.0  # in the prompt, positive: divided once
    expected[0, 2] = -1.0 * 2.0  # generated twice, negative: multiplied once
    expected[1, 3] = 3.0 - (0.5 + 3 * 0.25)  # prompt token 5 untouched
    expected[1, 4] = -0.5 - (0.5 + 1 * 0.25)
    expected[3, 0] = (-1.0 + 2.0) / 2.0  # bias first, then the penalty on the now positive logit
    expected[3, 4] = -0.5 - 100.0
    expected[4, 5] = 0.5 + 1.0  # a negative presence penalty encourages the token
    torch.testing.assert_close(processed, expected, rtol=0, atol=1e-6)
    assert process_logits(logits, [SamplingParams()] * 5, outputs, prompts) is logits


def test_reject_penalty_tokens_outside_vocab() -> None:
    params = [SamplingParams(repetition_penalty=1.2)]
    with pytest.raises(ValueError, match="token ids"):
        process_logits(torch.zeros(1, 10), params, [[3]], [[10]])
    with pytest.raises(ValueError, match="token ids"):
        process_logits(torch.zeros(1, 10), [SamplingParams(presence_penalty=1.0)], [[-1]])


def test_bias_logits_towards_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2))
    forced = draw_many(logits, SamplingParams(logit_bias={17: 100.0}), 200)
    assert set(forced.tolist()) == {17}
    best = int(logits.argmax())
    second = int(logits[0].argsort(descending=True)[1])
    banned = SamplingParams(temperature=0.0, logit_bias={best: -100.0})
    assert sample(logits, [banned], [None], [[]]).token_ids.item() == second


def test_temperature_reshapes_distribution() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    logits = logits_for(probs.tolist())
    top_frequencies = []
    for temperature in (0.5, 1.0, 2.0):
        draws = draw_many(logits, SamplingParams(temperature=temperature), 20000)
        frequencies = torch.bincount(draws, minlength=4).double() / draws.numel()
        tempered = probs ** (1.0 / temperature)
        torch.testing.assert_close(frequencies, tempered / tempered.sum(), rtol=0, atol=0.02)
        top_frequencies.append(frequencies[0].item())
    # sharper below 1 (expected 0.72), flatter above (expected 0.37)
    assert top_frequencies[0] > top_frequencies[1] + 0.1
    assert top_frequencies[1] > top_frequencies[2] + 0.1


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_random_sampling_follows_distribution() -> None:
    torch.manual_seed(1234)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    draws = draw_many(logits_for(probs.tolist()), SamplingParams(), 20000)
    counts = torch.bincount(draws, minlength=4).double()
    # 16.27 is the 0.999 quantile of chi-square with 3 degrees of freedom
    assert chi_square(counts, probs) < 16.27
    # the same counts clearly reject a nearby wrong distribution, so the check has teeth
    assert chi_square(counts, torch.tensor([0.12, 0.2, 0.3, 0.38], dtype=torch.float64)) > 16.27


def test_seeded_draws_use_own_generator() -> None:
    logits = torch.zeros(1, 1000)  # uniform: every token comes from the noise alone
    params = SamplingParams(seed=5)
    first = [sample(logits, [params], [make_generator(5)], [[]]).token_ids.item() for _ in "ab"]
    torch.manual_seed(99)  # the global RNG plays no part in a seeded row
    generator = make_generator(5)
    again = [sample(logits, [params], [generator], [[]]).token_ids.item() for _ in "ab"]
    assert first[0] == first[1] == again[0]
    assert again[1] != again[0]  # the generator advances from one step to the next
    other_seed = sample(logits, [SamplingParams(seed=6)], [make_generator(6)], [[]])
    assert other_seed.token_ids.item() != first[0]


VOCAB = 500
NUM_STEPS = 6
TARGET = SamplingParams(seed=1234, temperature=0.9, top_k=200, presence_penalty=0.5)


def run_target(layout: list[str | SamplingParams], target: SamplingParams = TARGET) -> list[int]:
    """Decode NUM_STEPS steps with the target row placed among other rows; return its tokens.

    `layout` holds "target" or another row's params; the other rows get fresh random logits.
    """
    torch.manual_seed(len(layout))  # the unseeded rows' draws differ from layout to layout
    target_logits = torch.randn(NUM_STEPS, VOCAB, generator=torch.Generator().manual_seed(7))
    params = [row if isinstance(row, SamplingParams) else target for row in layout]
    generators = [None if p.seed is None else make_generator(p.seed) for p in params]
    outputs: list[list[int]] = [[] for _ in layout]
    for step in range(NUM_STEPS):
        logits = torch.randn(len(layout), VOCAB) * 3.0
        logits[layout.index("target")] = target_logits[step]
        out = sample(logits, params, generators, outputs)
        for row, token in enumerate(out.token_ids.tolist()):
            outputs[row].append(token)
    return outputs[layout.index("target")]


def test_reproduce_seeded_row_in_any_batch() -> None:
    alone = run_target(["target"])
    layouts: list[list[str | SamplingParams]] = [
        [SamplingParams(), "target", SamplingParams(seed=7, top_p=0.5)],
        [SamplingParams(seed=1234, temperature=1.3), SamplingParams(temperature=0.0), "target"],
        ["target", *[SamplingParams(top_k=3, seed=row) for row in range(5)], SamplingParams()],
        [SamplingParams(min_p=0.2)] * 4 + ["target"] + [SamplingParams(frequency_penalty=1.0)] * 3,
    ]
    for layout in layouts:
        assert run_target(layout) == alone
    assert len(set(alone)) > 1
    other_seed = SamplingParams(seed=1235, temperature=0.9, top_k=200, presence_penalty=0.5)
    assert run_target(["target"], other_seed) != alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_report_raw_logprobs(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=1),
        SamplingParams(top_k=2, logit_bias={5: 3.0}, logprobs=5),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=2),
        SamplingParams(top_p=0.3, min_p=0.5, logprobs=0),
        SamplingParams(),  # asks for nothing: no log-probabilities are computed for it
    ]
    outputs = [[1, 2], [5], [int(logits[2].argmax())], [], []]
    out = sample(logits, params, [None] * 5, outputs)
    raw = torch.log_softmax(logits.double(), dim=-1)[:4]
    expected_chosen = raw.gather(1, out.token_ids[:4].unsqueeze(1)).squeeze(1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs[:4].double(), expected_chosen, rtol=0, atol=1e-5)
    assert math.isnan(out.logprobs[4].item())
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.top_token_ids.shape == out.top_logprobs.shape == (5, 5)
    five_largest = raw.sort(dim=-1, descending=True).values[:, :5]
    torch.testing.assert_close(out.top_logprobs[:4].double(), five_largest, rtol=0, atol=1e-5)
    at_ids = raw.gather(1, out.top_token_ids[:4])
    torch.testing.assert_close(out.top_logprobs[:4].double(), at_ids, rtol=0, atol=1e-5)
    assert out.processed_logprobs is None  # nobody asked for processed ones


def renormalised(logits_row: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """log of the softmax of `logits_row` [V] restricted to the `kept` mask, in float64."""
    masked = logits_row.double().masked_fill(~kept, -math.inf)
    return torch.log_softmax(masked, dim=-1)


def test_report_processed_logprobs_after_each_stage() -> None:
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 300, generator=generator) * 2.0
    modes = ["processed_logprobs", "raw_and_processed_logprobs"]
    params = [
        SamplingParams(temperature=0.7, top_k=20, logprobs=5, logprobs_mode=modes[0], seed=1),
        SamplingParams(top_p=0.6, logprobs=5, logprobs_mode=modes[1], seed=2),
        SamplingParams(temperature=1.3, min_p=0.2, logprobs=3, logprobs_mode=modes[0], seed=3),
        SamplingParams(
            temperature=0.0,
            top_k=4,
            logit_bias={7: 5.0},
            repetition_penalty=1.4,
            logprobs=4,
            logprobs_mode=modes[1],
        ),
        SamplingParams(presence_penalty=1.0, top_k=50, logprobs=2, logprobs_mode=modes[0], seed=4),
    ]
    outputs = [[], [], [], [11, 12], [9, 9, 10]]
    prompts = [[], [], [], [13], []]
    out = sample(logits, params, [make_generator(p.seed or 0) for p in params], outputs, prompts)
    processed = process_logits(logits, params, outputs, prompts).double()
    expected_rows = []
    for row, p in enumerate(params):
        # what the token was drawn from: processed logits, tempered, cut by every filter
        scaled = processed[row] / (p.temperature if not p.is_greedy else 1.0)
        kept = truncate_logits(scaled[None].float(), [p])[0] > -math.inf
        expected_rows.append(renormalised(scaled, kept))
    expected = torch.stack(expected_rows)
    assert out.processed_logprobs is not None
    chosen = expected.gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.processed_logprobs.double(), chosen, rtol=0, atol=1e-5)
    assert out.processed_top_logprobs is not None and out.processed_top_token_ids is not None
    for row, p in enumerate(params):
        n = p.num_logprobs
        top = out.processed_top_logprobs[row, :n].double()
        torch.testing.assert_close(
            top, expected[row].sort(descending=True).values[:n], atol=1e-5, rtol=0
        )
        assert bool(expected[row][out.token_ids[row]] > -math.inf)  # drawn from what is kept
    # both: the processed values at the raw top ids, -inf where a filter cut the candidate
    assert out.processed_at_raw_top is not None and out.top_token_ids is not None
    for row in (1, 3):
        at_raw = expected[row].gather(0, out.top_token_ids[row])
        torch.testing.assert_close(
            out.processed_at_raw_top[row].double(), at_raw, rtol=0, atol=1e-5
        )
    assert bool(torch.isinf(out.processed_at_raw_top[3]).any())  # top-4 cuts raw candidates


def test_keep_input_logits_unchanged() -> None:
    params = [
        SamplingParams(top_k=5, top_p=0.9, min_p=0.05, logprobs=3),  # temperature 1: no copy
        SamplingParams(temperature=0.0, logit_bias={1: 5.0}),
        SamplingParams(repetition_penalty=1.3, presence_penalty=1.0, seed=3),
    ]
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(3, 80).to(dtype)
        before = logits.clone()
        generators = [None, None, make_generator(3)]
        sample(logits, params, generators, [[1, 2], [3], [4, 4]], [[5], [6], [7]])
        sample(logits[:1], params[:1], [None], [[]])
        assert torch.equal(logits, before)


def generators_for(params: list[SamplingParams]) -> list[torch.Generator | None]:
    """Fresh generators, as the engine makes them when a request arrives."""
    return [None if p.seed is None else make_generator(p.seed) for p in params]


def test_give_each_row_of_mixed_batch_its_own_result() -> None:
    torch.manual_seed(0)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=3.0),
        SamplingParams(top_k=5, seed=11),
        SamplingParams(top_p=0.7, temperature=0.8, seed=12),
        SamplingParams(min_p=0.1, seed=13, logprobs=2),
        SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, logit_bias={3: 4.0}, seed=14),
        SamplingParams(temperature=1.5, top_k=20, top_p=0.9, seed=15, logprobs=4),
    ]
    num_rows = len(params)
    logits = torch.randn(num_rows, 200, generator=torch.Generator().manual_seed(4)) + 2.0
    outputs = [[int(logits[row].argmax()), 3, 3] for row in range(num_rows)]
    prompts = [[row, 10 + row] for row in range(num_rows)]
    alone = [
        sample(
            logits[i : i + 1], [params[i]], generators_for([params[i]]), [outputs[i]], [prompts[i]]
        )
        for i in range(num_rows)
    ]
    # the greedy row's penalty moves it off the raw argmax, so penalties really are applied
    assert alone[0].token_ids.item() != int(logits[0].argmax())

    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]):
        # the batch also holds an unseeded row drawing from the global RNG
        batch_params = [params[i] for i in order] + [SamplingParams(top_k=3)]
        out = sample(
            torch.cat([logits[order], torch.randn(1, 200)]),
            batch_params,
            generators_for(batch_params),
            [outputs[i] for i in order] + [[]],
            [prompts[i] for i in order] + [[]],
        )
        assert out.top_token_ids is not None and out.top_logprobs is not None
        for position, i in enumerate(order):
            single = alone[i]
            assert out.token_ids[position] == single.token_ids[0]
            wanted = params[i].num_logprobs
            if params[i].logprobs is not None:
                assert out.logprobs is not None and single.logprobs is not None
                torch.testing.assert_close(out.logprobs[position], single.logprobs[0])
            if wanted:
                assert single.top_token_ids is not None and single.top_logprobs is not None
                assert out.top_token_ids is not None and out.top_logprobs is not None
                assert torch.equal(out.top_token_ids[position, :wanted], single.top_token_ids[0])
                torch.testing.assert_close(
                    out.top_logprobs[position, :wanted], single.top_logprobs[0]
                )


def test_fast_argmax_equals_torch_argmax_with_ties() -> None:
    from model.sampling import argmax_rows

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 50257, generator=generator)
    x[1, 50250] = 100.0  # in the tail past the last whole block
    x[2, 3] = x[2, 7] = 100.0  # a tie: the lowest index
    x[3, 2047] = x[3, 2048] = 50.0  # a tie across two blocks
    x[4, 50200] = x[4, 50256] = 80.0  # a tie between the last block and the tail
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    coarse = torch.randint(0, 3, (30, 9000), generator=generator).float()  # many ties
    assert torch.equal(argmax_rows(coarse), coarse.argmax(dim=-1))
    short = torch.randn(5, 100, generator=generator)
    assert torch.equal(argmax_rows(short), short.argmax(dim=-1))


def test_the_compiled_argmax_of_few_rows_equals_torchs() -> None:
    """Rows of up to NATIVE_ARGMAX_MAX_ROWS go through the compiled argmax: ties, infinities and
    NaNs as torch's argmax takes them, and odd lengths (the vector loop's tail)."""
    from model.native_decode import native_argmax
    from model.sampling import NATIVE_ARGMAX_MAX_ROWS, argmax_rows

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NATIVE_ARGMAX_MAX_ROWS, 50257, generator=generator)
    if native_argmax(x) is None:
        pytest.skip("the compiled library is unavailable here")
    x[0, 5], x[0, 40000] = 9.0, 9.0  # a tie: the lowest index
    x[1, 50256] = float("inf")  # the last element, in the tail past the vectors
    x[2, 17], x[2, 300] = float("nan"), float("nan")  # the first NaN, as torch's
    x[3, :] = float("-inf")  # nothing but -inf: index 0
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    for vocab in (1, 15, 16, 17, 101):  # shorter than a vector, exactly one, one over
        short = torch.randn(2, vocab, generator=generator)
        assert torch.equal(native_argmax(short), short.argmax(dim=-1))
    strided = torch.randn(50257, 2, generator=generator).t()  # not contiguous
    assert torch.equal(argmax_rows(strided), strided.argmax(dim=-1))
    with pytest.raises(ValueError, match="float32"):
        native_argmax(x.double())


def test_bans_leave_raw_logprobs_alone() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.0, logprobs=2)
    out = sampling.sample(logits, new_states([params], 4), bans={0: [0]})
    assert out.token_ids.item() == 1  # token 0 may not be picked this step
    raw = torch.log_softmax(logits, dim=-1)[0]
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.logprobs.item() == pytest.approx(raw[1].item())  # the model's own softmax
    assert out.top_logprobs[0].tolist() == pytest.approx(raw.topk(2).values.tolist())
