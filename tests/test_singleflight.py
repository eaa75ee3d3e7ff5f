"""SingleFlight: one shared, shielded task per key."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from mirror.proxy.singleflight import SingleFlight


class Work:
    """A controllable piece of work that counts its executions."""

    def __init__(self, result: Any = "result", error: BaseException | None = None) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = 0
        self.cancelled = 0
        self.result = result
        self.error = error

    async def __call__(self) -> Any:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.error is not None:
            raise self.error
        return f"{self.result}-{self.calls}"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("callers", [1, 2, 10, 100], ids=["1", "2", "10", "100"])
async def test_concurrent_callers_share_one_execution(callers: int) -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    tasks = [asyncio.create_task(flight.run("key", work)) for _ in range(callers)]
    await work.started.wait()
    await settle()
    assert flight.running("key")
    assert len(flight) == 1
    work.release.set()
    results = await asyncio.gather(*tasks)
    assert results == ["result-1"] * callers
    assert work.calls == 1
    assert not flight.running("key")
    assert len(flight) == 0


async def test_different_keys_run_separately() -> None:
    flight: SingleFlight[str] = SingleFlight()
    a, b = Work("a"), Work("b")
    ta = asyncio.create_task(flight.run(("get", "repo", "a"), a))
    tb = asyncio.create_task(flight.run(("get", "repo", "b"), b))
    await a.started.wait()
    await b.started.wait()
    assert len(flight) == 2
    a.release.set()
    b.release.set()
    assert await ta == "a-1"
    assert await tb == "b-1"


async def test_cancelled_caller_does_not_cancel_shared_task() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    leaving = asyncio.create_task(flight.run("key", work))
    staying = asyncio.create_task(flight.run("key", work))
    await work.started.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await settle()
    assert work.cancelled == 0
    assert flight.running("key")
    work.release.set()
    assert await staying == "result-1"
    assert work.calls == 1
    assert work.finished == 1


async def test_work_continues_when_every_caller_leaves() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    caller = asyncio.create_task(flight.run("key", work))
    await work.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert flight.running("key")
    # A caller arriving later joins the same, still running, execution.
    late = asyncio.create_task(flight.run("key", work))
    await settle()
    work.release.set()
    assert await late == "result-1"
    assert work.calls == 1
    assert work.cancelled == 0


@pytest.mark.parametrize("error", [ValueError("boom"), KeyError("k"), RuntimeError("upstream")],
                         ids=["ValueError", "KeyError", "RuntimeError"])
async def test_exceptions_propagate_to_all_callers(error: Exception) -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work(error=error)
    tasks = [asyncio.create_task(flight.run("key", work)) for _ in range(5)]
    await work.started.wait()
    work.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is error for r in results)
    assert work.calls == 1
    assert not flight.running("key")


async def test_new_call_after_completion_runs_again() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    work.release.set()
    assert await flight.run("key", work) == "result-1"
    assert not flight.running("key")
    assert await flight.run("key", work) == "result-2"
    assert work.calls == 2


async def test_new_call_after_failure_runs_again() -> None:
    flight: SingleFlight[str] = SingleFlight()
    failing = Work(error=ValueError("first"))
    failing.release.set()
    with pytest.raises(ValueError):
        await flight.run("key", failing)
    assert not flight.running("key")
    ok = Work()
    ok.release.set()
    assert await flight.run("key", ok) == "result-1"


async def test_unobserved_failure_is_not_reported_as_never_retrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flight: SingleFlight[str] = SingleFlight()
        work = Work(error=ValueError("nobody is listening"))
        caller = asyncio.create_task(flight.run("key", work))
        await work.started.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        work.release.set()
        await settle()
        assert not flight.running("key")
        del caller, work, flight
        gc.collect()
        await settle()
    finally:
        loop.set_exception_handler(previous)
    assert [c for c in reported if "never retrieved" in str(c.get("message", ""))] == []


async def test_cancel_all_stops_work() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    callers = [asyncio.create_task(flight.run(k, work)) for k in ("a", "b")]
    await work.started.wait()
    await settle()
    await flight.cancel_all()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert work.cancelled == 2
    assert len(flight) == 0


# -- bounded waits on shared work (mirror.proxy.waits) ------------------------------------


async def test_within_bounds_the_wait_not_the_shielded_work() -> None:
    from mirror import errors
    from mirror.proxy.waits import within

    flight: SingleFlight[Any] = SingleFlight()
    work = Work()
    with pytest.raises(errors.Unavailable):
        await within(flight.run("k", work), 0.05)
    assert flight.running("k") and work.cancelled == 0  # the work goes on without its waiter
    work.release.set()
    assert await flight.run("k", work) == "result-1" and work.calls == 1


async def test_a_refresh_with_a_fallback_stops_waiting_at_its_first_failed_attempt() -> None:
    from mirror import errors
    from mirror.proxy.waits import Refreshes
    from mirror.upstream.client import retry_observer

    refreshes: Refreshes[str] = Refreshes()
    attempts: list[int] = []
    retried = asyncio.Event()

    async def refresh() -> str:
        attempts.append(1)
        observer = retry_observer.get()
        assert observer is not None
        observer(errors.Unavailable("attempt 1"))  # what Upstream._retrying does before its backoff
        await retried.wait()
        attempts.append(2)
        return "fresh"

    with pytest.raises(errors.Unavailable):  # the caller serves its cached answer now
        await refreshes.run("tag", refresh, fallback=True, patience=30, bound=None)
    with pytest.raises(errors.Unavailable):  # a later caller too, without a refresh of its own
        await refreshes.run("tag", refresh, fallback=True, patience=30, bound=None)
    assert attempts == [1]
    retried.set()  # the retry, in the background, succeeds
    assert await refreshes.run("tag", refresh, fallback=False, patience=30, bound=5) == "fresh"
    assert attempts == [1, 2]
    assert retry_observer.get() is None  # never leaks into the caller's context
    await refreshes.close()
