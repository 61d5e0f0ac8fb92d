"""The bounded queue between ingest and inference, with a configured overflow policy.

Policies (frames only; run start/stop items are never dropped, so a run is always closed):

* ``block``: ``put`` waits for space (back-pressure on our ingest thread; the microscope's PUB
  socket never blocks, ZeroMQ buffers up to its high-water mark);
* ``drop_oldest``: a full queue drops its oldest frame (reason ``queue_full``);
* ``latest_only``: live view; a new frame replaces every queued frame (reason ``superseded``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Policy = Literal["block", "drop_oldest", "latest_only"]


class Closed(Exception):
    """The queue was closed and is empty."""


class FrameQueue(Generic[T]):
    def __init__(self, maxsize: int, policy: Policy, is_droppable: Callable[[T], bool],
                 on_drop: Callable[[T, str], None]) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize, self.policy = maxsize, policy
        self._droppable, self._on_drop = is_droppable, on_drop
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _frames(self) -> int:
        return sum(1 for i in self._items if self._droppable(i))

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Enqueue; returns False when the item itself was dropped (block timed out or closed)."""
        dropped: list[tuple[T, str]] = []
        with self._cond:
            if self._closed:
                dropped.append((item, "shutdown"))
            elif not self._droppable(item):
                self._items.append(item)  # run events always pass
            elif self.policy == "latest_only":
                kept = deque(i for i in self._items if not self._droppable(i))
                dropped += [(i, "superseded") for i in self._items if self._droppable(i)]
                self._items = kept
                self._items.append(item)
            elif self.policy == "drop_oldest":
                while self._frames() >= self.maxsize:
                    for k, i in enumerate(self._items):
                        if self._droppable(i):
                            del self._items[k]
                            dropped.append((i, "queue_full"))
                            break
                self._items.append(item)
            else:
                ok = self._cond.wait_for(lambda: self._closed or self._frames() < self.maxsize, timeout)
                if ok and not self._closed:
                    self._items.append(item)
                else:
                    dropped.append((item, "shutdown" if self._closed else "queue_full"))
            self._cond.notify_all()
        for i, reason in dropped:
            self._on_drop(i, reason)
        return not any(i is item for i, _ in dropped)

    def get(self, timeout: float | None = None) -> T | None:
        """Next item, None on timeout; raises Closed once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                raise Closed
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_many(self, n: int, timeout: float | None = None) -> list[T]:
        """Up to ``n`` items, in order, of those waiting at the call; when none was, the first to
        come (within ``timeout``; [] when none came), as ``get``. Raises Closed once closed and
        drained."""
        with self._cond:
            if not self._items:
                n = 1  # what arrives while the caller waits is taken as it comes, one at a time
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return []
            if not self._items:
                raise Closed
            items = [self._items.popleft() for _ in range(min(n, len(self._items)))]
            self._cond.notify_all()
            return items

    def close(self) -> None:
        """No more puts; gets drain what is queued, then raise Closed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
