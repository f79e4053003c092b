"""The engine thread: the only caller of the `SlotEngine`, fed by a bounded waiting queue.

Each turn it frees the slots of cancelled requests, admits waiting requests into the free
slots (prefilled together), runs one engine step over the live slots, and hands every event to
its request's callback (called on this thread: the HTTP side forwards it to its event loop).
Submitting to a full queue raises `QueueFull`; after `close()` submissions raise `Closed`, the
requests already taken finish, then the thread ends.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from owl_jax.generate.slots import Event, SlotEngine, SlotRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


class Scheduler:
    def __init__(self, engine: SlotEngine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._callbacks: dict[int, Callable[[Event], None]] = {}
        self._cancel: list[SlotRequest] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="owl-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self):
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self.engine.active

    def submit(self, req: SlotRequest, callback: Callable[[Event], None]):
        """Queues a checked request (`engine.check`); callback(event) gets its events."""
        with self._cv:
            if self._closing or not self.alive:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._callbacks[req.id] = callback
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: SlotRequest):
        """Drops a request wherever it is (no more events); its slot frees at the next turn."""
        with self._cv:
            self._callbacks.pop(req.id, None)
            try:
                self._waiting.remove(req)
            except ValueError:
                self._cancel.append(req)
            self._cv.notify()

    def close(self, timeout: float | None = None):
        """Stops taking requests; returns when those taken have finished (or timeout)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self):
        engine = self.engine
        while True:
            with self._cv:
                while not (self._waiting or self._cancel or engine.busy or self._closing):
                    self._cv.wait()
                if self._closing and not (self._waiting or engine.busy):
                    return
                cancel, self._cancel = self._cancel, []
                for r in cancel:
                    engine.cancel(r)
                take = [self._waiting.popleft()
                        for _ in range(min(engine.free, len(self._waiting)))]
            try:
                events = engine.admit(take) if take else []
                events += engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                self.error = e
                events = []
                for r in take + [r for r in engine.live if r is not None]:
                    engine.cancel(r)
                    events.append(Event(r, [], "error"))
            self._deliver(events)

    def _deliver(self, events):
        with self._cv:
            calls = [(self._callbacks.get(e.request.id), e) for e in events]
            for e in events:
                if e.finish_reason is not None:
                    self._callbacks.pop(e.request.id, None)
        for cb, e in calls:
            if cb is not None:
                try:
                    cb(e)
                except Exception:  # noqa: BLE001 - e.g. its event loop closed: drop it
                    log.exception("delivering an event failed; cancelling its request")
                    self.cancel(e.request)
