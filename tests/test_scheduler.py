"""The scheduler alone, without a model: admission, slots, order, limits."""

from __future__ import annotations

import pytest

from model.sampling_params import SamplingParams
from service.engine.errors import QueueFullError
from service.engine.params import StopParams
from service.engine.request import Request, RequestStatus
from service.engine.scheduler import Scheduler


def make_request(request_id: str, num_prompt_tokens: int = 4) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(num_prompt_tokens)),
        sampling=SamplingParams(temperature=0.0),
        stop=StopParams(max_new_tokens=8),
        max_total_tokens=num_prompt_tokens + 8,
        sink=lambda _: None,
    )


def run_prefill(scheduler: Scheduler) -> None:
    """Pretend the model ran this step's prompt chunks."""
    for chunk in scheduler.schedule().prefills:
        chunk.request.num_computed_tokens += chunk.length


def test_admit_requests_into_free_slots_up_to_capacity() -> None:
    scheduler = Scheduler(num_slots=2, max_waiting=10, max_prefill_tokens=100)
    requests = [make_request(f"r{i}") for i in range(3)]
    for request in requests:
        scheduler.add(request)
    out = scheduler.schedule()
    assert [chunk.request.request_id for chunk in out.prefills] == ["r0", "r1"]
    assert {r.slot for r in requests[:2]} == {0, 1}
    assert requests[2].status is RequestStatus.WAITING and requests[2].slot is None
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1


def test_decode_rows_and_new_prompts_share_a_step() -> None:
    scheduler = Scheduler(num_slots=4, max_waiting=10, max_prefill_tokens=100)
    first = make_request("first")
    scheduler.add(first)
    run_prefill(scheduler)
    second = make_request("second")
    scheduler.add(second)
    out = scheduler.schedule()
    assert out.decodes == [first]
    assert [chunk.request for chunk in out.prefills] == [second]


def test_reuse_slot_after_finish() -> None:
    scheduler = Scheduler(num_slots=1, max_waiting=10, max_prefill_tokens=100)
    first, second = make_request("a"), make_request("b")
    scheduler.add(first)
    scheduler.add(second)
    run_prefill(scheduler)
    scheduler.finish(first)
    assert first.status is RequestStatus.FINISHED and scheduler.num_free_slots == 1
    out = scheduler.schedule()
    assert [chunk.request for chunk in out.prefills] == [second]
    assert second.slot == first.slot == 0


def test_reuse_slot_after_abort_of_waiting_and_running() -> None:
    scheduler = Scheduler(num_slots=1, max_waiting=10, max_prefill_tokens=100)
    running, waiting, later = make_request("run"), make_request("wait"), make_request("later")
    for request in (running, waiting, later):
        scheduler.add(request)
    run_prefill(scheduler)
    scheduler.finish(waiting)  # aborted while queued: leaves the queue, holds no slot
    assert scheduler.num_waiting == 1 and scheduler.num_free_slots == 0
    scheduler.finish(running)  # aborted while running: its slot is free at once
    assert scheduler.num_free_slots == 1 and scheduler.num_running == 0
    out = scheduler.schedule()
    assert [chunk.request for chunk in out.prefills] == [later]
    assert scheduler.get("run") is None and scheduler.get("wait") is None


def test_admit_first_come_first_served() -> None:
    scheduler = Scheduler(num_slots=1, max_waiting=10, max_prefill_tokens=100)
    requests = [make_request(f"r{i}") for i in range(5)]
    for request in requests:
        scheduler.add(request)
    order = []
    while scheduler.has_work():
        out = scheduler.schedule()
        for chunk in out.prefills:
            order.append(chunk.request.request_id)
            chunk.request.num_computed_tokens += chunk.length
        for request in list(scheduler.running):
            scheduler.finish(request)
    assert order == [f"r{i}" for i in range(5)]


def test_reject_add_when_queue_full() -> None:
    scheduler = Scheduler(num_slots=1, max_waiting=2, max_prefill_tokens=100)
    for i in range(3):  # one goes straight to the free slot, two wait
        scheduler.add(make_request(f"r{i}"))
    with pytest.raises(QueueFullError, match="full"):
        scheduler.add(make_request("overflow"))
    scheduler.schedule()  # r0 takes the slot; r1 and r2 still fill the queue
    with pytest.raises(QueueFullError):
        scheduler.add(make_request("overflow-again"))
    scheduler.finish(scheduler.running[0])  # a free slot takes one more
    scheduler.add(make_request("fits"))
    with pytest.raises(QueueFullError):
        scheduler.add(make_request("overflow-third"))


def test_reject_duplicate_request_id() -> None:
    scheduler = Scheduler(num_slots=1, max_waiting=2, max_prefill_tokens=100)
    scheduler.add(make_request("same"))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add(make_request("same"))


def test_chunk_long_prompt_across_steps_without_blocking_decodes() -> None:
    scheduler = Scheduler(num_slots=4, max_waiting=10, max_prefill_tokens=16)
    short = make_request("short", 4)
    scheduler.add(short)
    run_prefill(scheduler)
    long = make_request("long", 40)
    scheduler.add(long)
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        assert out.decodes == [short]  # the running stream advances every step
        assert sum(chunk.length for chunk in out.prefills) <= 16
        for chunk in out.prefills:
            chunks.append((chunk.start, chunk.length, chunk.completes_prompt))
            chunk.request.num_computed_tokens += chunk.length
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert scheduler.schedule().decodes == [short, long]


def test_older_partial_prompt_goes_before_new_arrivals() -> None:
    scheduler = Scheduler(num_slots=4, max_waiting=10, max_prefill_tokens=10)
    long, new = make_request("long", 25), make_request("new", 3)
    scheduler.add(long)
    run_prefill(scheduler)  # 10 of 25 done
    scheduler.add(new)
    out = scheduler.schedule()
    assert [(c.request.request_id, c.length) for c in out.prefills] == [("long", 10)]
    for chunk in out.prefills:
        chunk.request.num_computed_tokens += chunk.length
    out = scheduler.schedule()
    assert [(c.request.request_id, c.length) for c in out.prefills] == [("long", 5), ("new", 3)]


def test_reject_invalid_limits() -> None:
    with pytest.raises(ValueError, match="num_slots"):
        Scheduler(num_slots=0, max_waiting=1, max_prefill_tokens=1)
