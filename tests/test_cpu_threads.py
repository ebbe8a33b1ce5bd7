"""One OpenMP team per process: idle teams are released, and the engine computes on one thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.async_engine import AsyncEngine
from service.engine.config import EngineConfig
from service.engine.cpu_threads import _libgomp, release_openmp_threads
from service.engine.errors import EngineDeadError, EngineNotReadyError, StepFailedError
from service.engine.llm_engine import LLMEngine
from service.engine.params import StopParams


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settle(expected: int, timeout: float = 2.0) -> int:
    """The process's thread count once it reaches `expected` (workers exit asynchronously)."""
    deadline = time.monotonic() + timeout
    while os_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return os_threads()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_release_ends_the_calling_threads_openmp_workers() -> None:
    if _libgomp() is None or torch.get_num_threads() < 2:
        pytest.skip("torch here does not run on libgomp with 2+ threads")
    results: dict[str, object] = {}
    x = torch.randn(512, 512)
    expected = (x.double() @ x.double()).float()

    def work() -> None:
        before = os_threads()
        (x @ x).sum()  # a parallel region: this thread gets a team of workers
        results["with_team"] = os_threads()
        results["released"] = release_openmp_threads()
        results["after"] = settle(before)
        results["before"] = before
        # The next parallel region starts a new team and computes as before.
        results["again"] = torch.allclose(x @ x, expected, rtol=1e-4, atol=1e-3)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results["released"] is True
    assert results["with_team"] > results["before"]  # type: ignore[operator]
    assert results["after"] == results["before"]
    assert results["again"] is True


def test_release_is_a_no_op_with_one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert release_openmp_threads() is False
    finally:
        torch.set_num_threads(threads)


def test_warm_up_and_steps_run_on_the_engine_thread(tiny_model) -> None:  # type: ignore[no-untyped-def]
    llm = LLMEngine(tiny_model, Tokenizer.default(), EngineConfig(max_batch_size=2))
    seen: set[str] = set()
    warm_up, step = llm.warm_up, llm.step

    def recording_warm_up() -> None:
        seen.add("warm_up@" + threading.current_thread().name)
        warm_up()

    def recording_step():  # type: ignore[no-untyped-def]
        seen.add("step@" + threading.current_thread().name)
        return step()

    llm.warm_up = recording_warm_up  # type: ignore[method-assign]
    llm.step = recording_step  # type: ignore[method-assign]

    async def main() -> None:
        engine = AsyncEngine(llm)
        await engine.start(warm_up=True)
        stream = engine.submit([1, 2], SamplingParams(temperature=0.0), StopParams(3))
        events = [event async for event in stream]
        assert events[-1].num_output_tokens == 3
        await engine.shutdown()

    asyncio.run(main())
    assert seen == {"warm_up@engine-loop", "step@engine-loop"}


def test_a_failed_warm_up_step_fails_start_and_reports_the_engine_dead(tiny_model) -> None:  # type: ignore[no-untyped-def]
    llm = LLMEngine(tiny_model, Tokenizer.default(), EngineConfig(max_batch_size=2))

    def broken_execute(work):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory while warming up")

    llm.runner.execute = broken_execute  # type: ignore[method-assign]

    async def main() -> None:
        engine = AsyncEngine(llm)
        with pytest.raises(StepFailedError, match="out of memory while warming up"):
            await engine.start(warm_up=True)
        assert not engine.is_ready and not engine.is_alive
        assert not llm.has_work()  # the warm-up requests are gone, their slots free
        with pytest.raises(EngineDeadError):
            engine.submit([1], SamplingParams(), StopParams(2))

    asyncio.run(main())


async def start_held_in_warm_up(model) -> tuple[AsyncEngine, asyncio.Future, threading.Event]:  # type: ignore[no-untyped-def]
    """An engine whose start() is under way, its warm-up waiting for the returned gate."""
    llm = LLMEngine(model, Tokenizer.default(), EngineConfig(max_batch_size=2))
    started, gate = threading.Event(), threading.Event()
    warm_up = llm.warm_up

    def waiting_warm_up() -> None:
        started.set()
        gate.wait(10)
        warm_up()

    llm.warm_up = waiting_warm_up  # type: ignore[method-assign]
    engine = AsyncEngine(llm)
    starting = asyncio.ensure_future(engine.start(warm_up=True))
    assert await asyncio.to_thread(started.wait, 10)
    return engine, starting, gate


def test_shutdown_during_warm_up_fails_start(tiny_model) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine, starting, gate = await start_held_in_warm_up(tiny_model)
        stopping = asyncio.ensure_future(engine.shutdown())
        await asyncio.sleep(0.05)
        gate.set()
        await stopping
        with pytest.raises(EngineNotReadyError, match="shut down while it was starting"):
            await starting
        assert not engine.is_ready and not engine.is_alive and engine.error is None

    asyncio.run(main())


def test_a_cancelled_start_leaves_an_engine_that_shuts_down(tiny_model) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine, starting, gate = await start_held_in_warm_up(tiny_model)
        starting.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert not engine.is_ready
        await engine.shutdown()
        assert not engine.is_alive and engine.error is None

    asyncio.run(main())


def test_without_warm_up_the_decode_graphs_are_still_prepared(tiny_model) -> None:  # type: ignore[no-untyped-def]
    llm = LLMEngine(tiny_model, Tokenizer.default(), EngineConfig(max_batch_size=2))
    calls: list[str] = []
    llm.runner.capture_decode_graphs = lambda: calls.append(threading.current_thread().name)  # type: ignore[method-assign]

    async def main() -> None:
        engine = AsyncEngine(llm)
        await engine.start(warm_up=False)
        await engine.shutdown()

    asyncio.run(main())
    assert calls == ["engine-loop"]
