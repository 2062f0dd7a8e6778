"""`proxy.deadline.Deadline`: the relay's one-timer-per-try deadline, on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from turbofleet.proxy.deadline import SHUTDOWN, TIMEOUT, Deadline


async def test_fires_when_no_progress_and_the_cancellation_is_its_own() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadline(loop, 0.05)
    t0 = loop.time()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert dl.caught() == TIMEOUT
    assert 0.04 < loop.time() - t0 < 1
    await asyncio.sleep(0)  # the task is no longer cancelling: awaiting works again
    dl.close()


async def test_progress_keeps_it_alive_and_rearm_shortens_it() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadline(loop, 0.1)
    for _ in range(5):  # 0.25 s of steady progress under a 0.1 s gap
        await asyncio.sleep(0.05)
        dl.last = loop.time()
    dl.close()
    dl = Deadline(loop, 30.0)
    dl.rearm(0.05)  # a shorter span than the pending timer: it must fire on time
    t0 = loop.time()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert dl.caught() == TIMEOUT and loop.time() - t0 < 1


async def test_abort_says_shutdown() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadline(loop, 30.0)
    loop.call_later(0.01, dl.abort)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert dl.caught() == SHUTDOWN


async def test_someone_elses_cancellation_is_not_swallowed() -> None:
    async def victim() -> str:
        dl = Deadline(asyncio.get_running_loop(), 30.0)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert dl.caught() is None  # not ours: the client went away
            raise
        finally:
            dl.close()
        return "finished"

    task = asyncio.create_task(victim())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_both_at_once_is_still_a_cancellation() -> None:
    held: list[Deadline] = []

    async def victim() -> str | None:
        dl = Deadline(asyncio.get_running_loop(), 30.0)
        held.append(dl)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return dl.caught()
        return "no"

    task = asyncio.create_task(victim())
    await asyncio.sleep(0.01)
    held[0].abort()  # the deadline ends the try...
    task.cancel()  # ...and the client leaves, before the task runs again
    assert await task is None


async def test_absorb_consumes_a_foreign_cancellation() -> None:
    async def victim() -> str:
        dl = Deadline(asyncio.get_running_loop(), 30.0)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert dl.caught() is None and dl.absorb()
            await asyncio.sleep(0)  # no longer cancelled
            return "finished anyway"
        finally:
            dl.close()
        return "no"

    task = asyncio.create_task(victim())
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == "finished anyway"
