"""From the worker thread to one response on the event loop: events, delivered in batches.

The worker ``put``s each step's events and wakes the loop only where the response is waiting for them (parked in
``get``) and no wake-up is on its way already; the last event (``Finished`` or ``Failed``) always wakes it, setting
``ended``. A response that is behind, or that waits ``stream_interval`` between chunks (``wait_end``), takes all the
steps since in one go: one wake-up and one chunk instead of one per step, and no wake-up at all for the steps that
arrive while it waits out the interval. Each wake-up costs the loop, and through the GIL the worker, tens to
hundreds of microseconds on the CPU: a fast decoder's step on a GPU takes 1-2 ms.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from medusa_llama.serve.engine import Delta, Event


class Channel:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self.ended = asyncio.Event()  # the last event (Finished or Failed) has been put
        self._lock = threading.Lock()
        self._waiting = False  # the response is parked in get(): the next event must wake it
        self._woken = False  # a wake-up is scheduled and not yet consumed
        self._end_waiter: asyncio.Future | None = None  # wait_end's, resolved by the last event
        self.closed = False  # the loop is gone: nobody reads any more

    def put(self, event: Event) -> None:
        """Worker thread: queue an event, waking the loop if the response waits for it (the last event always
        wakes it, and sets ``ended``)."""
        last = not isinstance(event, Delta)
        with self._lock:
            self._items.append(event)
            wake = self._waiting and not self._woken
            self._woken = self._woken or wake
        if wake or last:
            try:
                self._loop.call_soon_threadsafe(self._wake, last)
            except RuntimeError:  # the event loop is closed
                self.closed = True
        elif self._loop.is_closed():
            self.closed = True

    def _wake(self, last: bool) -> None:
        self._ready.set()
        if last:
            self.ended.set()
            if self._end_waiter is not None and not self._end_waiter.done():
                self._end_waiter.set_result(None)

    async def get(self) -> list[Event]:
        """Event loop: take all the events there are, first waiting for one if there are none (after a late
        wake-up this may still return none)."""
        with self._lock:
            wait = self._waiting = not self._items
            if wait:
                self._ready.clear()
        if wait:
            await self._ready.wait()
        with self._lock:
            self._waiting = self._woken = False
            items = list(self._items)
            self._items.clear()
        return items

    async def wait_end(self, timeout: float) -> None:
        """Event loop: sleep ``timeout`` seconds, or less if the last event arrives meanwhile (no task is made)."""
        if self.ended.is_set():
            return
        waiter = self._end_waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._end_waiter = None


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
