"""From the worker thread to one response on the event loop: events, delivered in batches.

The worker ``put``s each step's events; the loop wakes only when it has consumed the previous batch, so a response
that is behind (or that waits ``stream_interval`` between chunks) takes all the steps since in one go: one wake-up
and one chunk instead of one per step. Waking the loop and sending a chunk cost the worker the GIL for a few
hundred microseconds on the CPU, more than a small model's whole decode step.
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
        self._woken = False  # a wake-up is scheduled and not yet consumed
        self.closed = False  # the loop is gone: nobody reads any more

    def put(self, event: Event) -> None:
        """Worker thread: queue an event, waking the loop unless a wake-up is already on its way (the last event
        always wakes it, and sets ``ended``)."""
        last = not isinstance(event, Delta)
        self._items.append(event)
        with self._lock:
            if self._woken and not last:
                return
            self._woken = True
        try:
            self._loop.call_soon_threadsafe(self._wake, last)
        except RuntimeError:  # the event loop is closed
            self.closed = True

    def _wake(self, last: bool) -> None:
        self._ready.set()
        if last:
            self.ended.set()

    async def get(self) -> list[Event]:
        """Event loop: wait for events and take all there are (possibly none, after a late wake-up)."""
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            self._woken = False  # before draining: an event put after this point wakes the loop again
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items
