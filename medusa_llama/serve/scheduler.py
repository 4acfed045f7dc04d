"""The scheduler: a FIFO queue of sequences and the one worker thread that owns the engine.

The worker admits waiting sequences while the engine has room (``engine.capacity``), advances the admitted ones
with ``engine.step`` and drops those that ended, so a batched engine gets continuous batching at step granularity
with no change here. A sequence cancelled while it waits is dropped when its turn comes, before any compute.
"""

from __future__ import annotations

import logging
import queue
import threading

from medusa_llama.serve.engine import Engine, Sequence

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences wait than the scheduler accepts."""


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int = 64):
        self.engine = engine
        self._queue: queue.Queue[Sequence | None] = queue.Queue(maxsize=max_waiting)
        self._active: list[Sequence] = []
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="medusa-engine", daemon=True)
            self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (any thread). Raises QueueFull when too many wait, RuntimeError once closing."""
        if self._closing.is_set():
            raise RuntimeError("the server is shutting down")
        try:
            self._queue.put_nowait(seq)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything, let the worker finish its current step and stop."""
        self._closing.set()
        for seq in list(self._active):
            seq.cancel()
        while True:  # fail what still waits; None wakes an idle worker
            try:
                seq = self._queue.get_nowait()
            except queue.Empty:
                break
            if seq is not None:
                seq.fail("the server is shutting down", status=503)
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # refilled by a racing submit: the worker sees _closing at its next get
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s", timeout)
            self._thread = None

    def _admit(self) -> bool:
        """Fill free slots from the queue, blocking only while nothing runs. False: closing."""
        while len(self._active) < self.engine.capacity:
            try:
                seq = self._queue.get(block=not self._active)
            except queue.Empty:
                return True
            if seq is None or self._closing.is_set():
                if seq is not None:
                    seq.fail("the server is shutting down", status=503)
                return False
            if seq.cancelled.is_set():
                seq.finish("cancelled")
                continue
            self._active.append(seq)
        return True

    def _run(self) -> None:
        log.debug("engine thread started (capacity %d)", self.engine.capacity)
        while self._admit():
            try:
                self.engine.step(self._active)
            except Exception as exc:  # a bug or a device error: fail these sequences, keep serving the others
                log.exception("decoding failed")
                for seq in self._active:
                    seq.fail(f"decoding failed: {type(exc).__name__}: {exc}")
            for seq in self._active:
                if not seq.done and seq.cancelled.is_set():
                    seq.finish("cancelled")
            self._active = [s for s in self._active if not s.done]
        for seq in self._active:
            seq.finish("cancelled")
        self._active = []
        log.debug("engine thread stopped")
