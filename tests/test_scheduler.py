"""The scheduler alone, without a model: admission, slots, order, fairness, prefix reuse."""

from __future__ import annotations

import pytest

from model.sampling_params import SamplingParams
from service.engine.params import StopParams
from service.engine.request import Request, RequestStatus
from service.engine.scheduler import Scheduler, SchedulerOutput
from service.engine.slot_pool import common_prefix_length


def make_request(
    request_id: str,
    num_prompt_tokens: int = 4,
    *,
    prompt: list[int] | None = None,
    client: str = "",
    group: str = "",
    priority: int = 0,
    max_new_tokens: int = 8,
) -> Request:
    tokens = prompt if prompt is not None else list(range(num_prompt_tokens))
    return Request(
        request_id=request_id,
        prompt_token_ids=tokens,
        sampling=SamplingParams(temperature=0.0),
        stop=StopParams(max_new_tokens=max_new_tokens),
        max_total_tokens=len(tokens) + max_new_tokens,
        sink=lambda _: None,
        client_id=client,
        group_id=group or request_id,
        priority=priority,
    )


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule and pretend the model ran: chunks are cached, finished prompts get a token."""
    return apply(scheduler.schedule())


def apply(out: SchedulerOutput) -> SchedulerOutput:
    """Pretend the model ran a scheduled step."""
    for chunk in out.prefills:
        chunk.request.num_computed_tokens += chunk.length
        if chunk.samples:
            chunk.request.output_token_ids.append(7)
    for request in out.decodes:
        request.num_computed_tokens += 1
        request.output_token_ids.append(7)
    return out


def ids(requests: list[Request]) -> list[str]:
    return [request.request_id for request in requests]


def test_admit_requests_into_free_slots_up_to_capacity() -> None:
    scheduler = Scheduler(num_slots=2, max_prefill_tokens=100)
    requests = [make_request(f"r{i}") for i in range(3)]
    for request in requests:
        scheduler.add(request)
    out = scheduler.schedule()
    assert [chunk.request.request_id for chunk in out.prefills] == ["r0", "r1"]
    assert {r.slot for r in requests[:2]} == {0, 1}
    assert requests[2].status is RequestStatus.WAITING and requests[2].slot is None
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1


def test_decode_rows_and_new_prompts_share_a_step() -> None:
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=100)
    first = make_request("first")
    scheduler.add(first)
    run_step(scheduler)
    second = make_request("second", prompt=[9, 8, 7])
    scheduler.add(second)
    out = scheduler.schedule()
    assert out.decodes == [first]
    assert [chunk.request for chunk in out.prefills] == [second]


def test_reuse_slot_after_finish_and_abort() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100, reuse_prefixes=False)
    running, waiting, later = make_request("run"), make_request("wait"), make_request("later")
    for request in (running, waiting, later):
        scheduler.add(request)
    run_step(scheduler)
    scheduler.finish(waiting)  # aborted while queued: leaves the queue, holds no slot
    assert scheduler.num_waiting == 1 and scheduler.num_free_slots == 0
    scheduler.finish(running)  # aborted while running: its slot is free at once
    assert running.status is RequestStatus.FINISHED
    assert scheduler.num_free_slots == 1 and scheduler.num_running == 0
    out = scheduler.schedule()
    assert [chunk.request for chunk in out.prefills] == [later]
    assert later.slot == 0 and later.num_computed_tokens == 0  # no reuse: computed from 0
    assert scheduler.get("run") is None and scheduler.get("wait") is None


def test_admit_first_come_first_served_among_equals() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100)
    requests = [make_request(f"r{i}", prompt=[i, 100 + i]) for i in range(5)]
    for request in requests:
        scheduler.add(request)
    order = []
    while scheduler.has_work():
        out = run_step(scheduler)
        order.extend(ids(out.admitted))
        for request in list(scheduler.running):
            scheduler.finish(request)
    assert order == [f"r{i}" for i in range(5)]


def test_reject_duplicate_request_id() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100)
    scheduler.add(make_request("same"))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add(make_request("same"))


def test_chunk_long_prompt_across_steps_without_blocking_decodes() -> None:
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=16)
    short = make_request("short", prompt=[1000, 1001, 1002, 1003])
    scheduler.add(short)
    run_step(scheduler)
    long = make_request("long", 40)
    scheduler.add(long)
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        assert out.decodes == [short]  # the running stream advances every step
        assert sum(chunk.length for chunk in out.prefills) <= 16
        chunks += [(c.start, c.length, c.samples) for c in out.prefills]
        apply(out)
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert scheduler.schedule().decodes == [short, long]


def test_older_partial_prompt_goes_before_new_arrivals() -> None:
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=10)
    long, new = make_request("long", 25), make_request("new", prompt=[500, 501, 502])
    scheduler.add(long)
    run_step(scheduler)  # 10 of 25 done
    scheduler.add(new)
    out = run_step(scheduler)
    assert [(c.request.request_id, c.length) for c in out.prefills] == [("long", 10)]
    out = run_step(scheduler)
    assert [(c.request.request_id, c.length) for c in out.prefills] == [("long", 5), ("new", 3)]


def test_score_only_request_does_not_sample() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100)
    scoring = make_request("score", 6, max_new_tokens=0)
    scheduler.add(scoring)
    (chunk,) = scheduler.schedule().prefills
    assert chunk.completes_tokens and not chunk.samples


def test_reject_invalid_limits() -> None:
    with pytest.raises(ValueError, match="num_slots"):
        Scheduler(num_slots=0, max_prefill_tokens=1)
    with pytest.raises(ValueError, match="max_slots_per_group"):
        Scheduler(num_slots=2, max_prefill_tokens=1, max_slots_per_group=0)


def test_light_client_goes_before_heavy_client() -> None:
    scheduler = Scheduler(num_slots=3, max_prefill_tokens=100)
    heavy = [make_request(f"h{i}", prompt=[i + 1, 50], client="heavy") for i in range(4)]
    for request in heavy:
        scheduler.add(request)
    run_step(scheduler)  # heavy holds all three slots, h3 waits
    light = make_request("light", prompt=[90, 91], client="light")
    scheduler.add(light)  # arrived after h3
    scheduler.finish(heavy[0])  # one slot frees
    out = run_step(scheduler)
    assert ids(out.admitted) == ["light"]  # the client with nothing in flight first


def test_preempt_heavy_client_for_waiting_light_one() -> None:
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=100)
    heavy = [make_request(f"h{i}", prompt=[i + 1, 60], client="heavy") for i in range(6)]
    for request in heavy:
        scheduler.add(request)
    run_step(scheduler)
    run_step(scheduler)
    newest_running = heavy[3]
    assert newest_running.num_output_tokens == 2
    light = make_request("light", prompt=[90, 91], client="light")
    scheduler.add(light)
    out = run_step(scheduler)
    assert ids(out.admitted) == ["light"] and ids(out.preempted) == ["h3"]
    # the preempted request waits with its output, and recomputes prompt + output later
    assert newest_running.status is RequestStatus.WAITING and newest_running.slot is None
    assert newest_running.num_output_tokens == 2 and newest_running.num_computed_tokens == 0
    # equal shares now (heavy 3, light 1 -> light may not take more than one more)
    second_light = make_request("light2", prompt=[92, 93], client="light")
    scheduler.add(second_light)
    out = run_step(scheduler)
    assert ids(out.admitted) == ["light2"] and ids(out.preempted) == ["h2"]
    third_light = make_request("light3", prompt=[94, 95], client="light")
    scheduler.add(third_light)
    out = run_step(scheduler)
    assert out.admitted == [] and out.preempted == []  # 2 vs 2: no ping-pong


def test_lower_priority_value_goes_first_and_preempts() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100)
    background = make_request("bg", prompt=[1, 2], priority=5)
    scheduler.add(background)
    run_step(scheduler)
    urgent = make_request("urgent", prompt=[3, 4], priority=-1)
    normal = make_request("normal", prompt=[5, 6], priority=0)
    scheduler.add(normal)
    scheduler.add(urgent)
    out = run_step(scheduler)
    assert ids(out.admitted) == ["urgent"] and ids(out.preempted) == ["bg"]
    scheduler.finish(urgent)
    out = run_step(scheduler)
    assert ids(out.admitted) == ["normal"]  # before the preempted, worse-priority bg


def test_group_slot_cap_makes_its_other_choices_wait() -> None:
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=100, max_slots_per_group=2)
    choices = [make_request(f"c{i}", prompt=[i + 1, 7], group="big") for i in range(4)]
    for request in choices:
        scheduler.add(request)
    other = make_request("other", prompt=[99, 98], group="small")
    scheduler.add(other)
    out = run_step(scheduler)
    assert ids(out.admitted) == ["c0", "c1", "other"]
    assert scheduler.num_free_slots == 1 and scheduler.num_waiting == 2  # not refused: waiting
    scheduler.finish(choices[0])
    out = run_step(scheduler)
    assert ids(out.admitted) == ["c2"]


def test_paused_request_keeps_its_slot_but_takes_no_step() -> None:
    scheduler = Scheduler(num_slots=2, max_prefill_tokens=100)
    slow, fast = make_request("slow", prompt=[1, 2]), make_request("fast", prompt=[3, 4])
    scheduler.add(slow)
    scheduler.add(fast)
    run_step(scheduler)
    slow.is_paused = True
    out = run_step(scheduler)
    assert out.decodes == [fast] and slow.slot is not None
    # a waiting request may take a paused request's slot
    newcomer = make_request("new", prompt=[5, 6])
    scheduler.add(newcomer)
    out = run_step(scheduler)
    assert ids(out.preempted) == ["slow"] and ids(out.admitted) == ["new"]


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [1]) == 0
    assert common_prefix_length([], [1]) == 0
    long = list(range(1000))
    for cut in (1, 511, 512, 999):
        other = long[:cut] + [-1] + long[cut + 1 :]
        assert common_prefix_length(long, other) == cut


def test_take_over_idle_slot_holding_the_prefix() -> None:
    scheduler = Scheduler(num_slots=2, max_prefill_tokens=100)
    header = list(range(100, 140))
    first = make_request("first", prompt=header + [1, 2])
    scheduler.add(first)
    run_step(scheduler)
    slot = first.slot
    scheduler.finish(first)  # its slot keeps the 42 prompt tokens
    second = make_request("second", prompt=header + [3, 4, 5])
    scheduler.add(second)
    out = run_step(scheduler)
    assert second.slot == slot and out.copies == []
    assert second.num_cached_tokens == 40
    assert [(c.start, c.length) for c in out.prefills] == [(40, 3)]
    # the slot now caches the second request's tokens, not the first's
    assert list(scheduler.pool.cached_tokens(second.slot)) == header + [3, 4, 5]


def test_copy_prefix_of_running_request_and_leave_one_token_to_compute() -> None:
    scheduler = Scheduler(num_slots=2, max_prefill_tokens=100)
    prompt = list(range(200, 230))
    running = make_request("running", prompt=prompt)
    scheduler.add(running)
    run_step(scheduler)
    same = make_request("same", prompt=list(prompt))
    scheduler.add(same)
    out = run_step(scheduler)
    (copy,) = out.copies
    assert (copy.source, copy.target, copy.num_tokens) == (running.slot, same.slot, 29)
    assert [(c.start, c.length) for c in out.prefills] == [(29, 1)]  # logits for its token


def test_n_choices_wait_for_the_first_to_compute_the_shared_prompt() -> None:
    scheduler = Scheduler(num_slots=4, max_prefill_tokens=32)
    prompt = list(range(300, 380))  # 80 tokens: three steps of 32
    choices = [make_request(f"c{i}", prompt=list(prompt), group="g") for i in range(4)]
    for request in choices:
        scheduler.add(request)
    computed = 0
    while not all(r.num_output_tokens for r in choices):
        out = run_step(scheduler)
        computed += out.num_prefill_tokens
    assert computed == 80 + 3  # the prompt once, then one token per other choice


def test_expired_prefix_is_never_reused() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100)
    first = make_request("first", prompt=[1, 2, 3, 4, 5, 6])
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first)
    overwriter = make_request("over", prompt=[9, 9, 9])
    scheduler.add(overwriter)
    run_step(scheduler)  # takes the only slot: the old prefix is gone from it
    scheduler.finish(overwriter)
    again = make_request("again", prompt=[1, 2, 3, 4, 5, 7])
    scheduler.add(again)
    run_step(scheduler)
    assert again.num_cached_tokens == 0


def test_paused_requests_never_take_each_others_slot() -> None:
    scheduler = Scheduler(num_slots=1, max_prefill_tokens=100)
    first, second = make_request("a", prompt=[1, 2]), make_request("b", prompt=[3, 4])
    scheduler.add(first)
    run_step(scheduler)
    scheduler.add(second)
    first.is_paused = second.is_paused = True  # both readers stopped reading
    out = run_step(scheduler)  # returns: a paused waiting request is not admitted
    assert out.admitted == [] and out.preempted == [] and first.slot == 0
    second.is_paused = False  # its reader caught up: it may take the paused one's slot, once
    out = run_step(scheduler)
    assert ids(out.admitted) == ["b"] and ids(out.preempted) == ["a"]
    assert first.status is RequestStatus.WAITING
