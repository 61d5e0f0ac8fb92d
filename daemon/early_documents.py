"""Documents that came before what they refer to, held for a bounded time.

Several publishers feed one proxy (a RunEngine, a detector process sending stream_datum, a second
RunEngine), and 0MQ keeps order per publisher only: an event can overtake its descriptor, a
stream_datum its stream_resource, a descriptor its start. The router holds such a document here,
keyed by the uid it is waiting for (a run, descriptor or resource uid), and replays it, in arrival
order, when that uid arrives. A document held longer than ``hold_s``, or pushed out by the bound on
count or bytes, is handed back to be counted under the reason it was held for (``unknown_run``,
``unknown_descriptor``, ``unknown_resource``). Pure: no sockets, no threads; the clock is injected.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Held:
    """One held document: what it waits for (``key``), why (``reason``, ``detail``), since when."""

    key: str
    name: str
    doc: dict[str, Any]
    reason: str
    detail: str
    since: float  # monotonic seconds when it first arrived (kept across re-holds)
    nbytes: int


def payload_bytes(doc: dict[str, Any]) -> int:
    """The bytes of the arrays in a document's ``data`` (an inline image), the part worth bounding."""
    data = doc.get("data")
    if not isinstance(data, dict):
        return 0
    return sum(v.nbytes for v in data.values() if isinstance(v, np.ndarray))


class EarlyDocuments:
    """Held documents by the uid they wait for; bounded by age, count and bytes.

    Parameters
    ----------
    hold_s
        Longest time a document is held, seconds; 0 holds nothing.
    max_documents, max_bytes
        Bounds on what is held at once (bytes: the arrays in held events' data); beyond them the
        oldest held document is handed back by ``hold``.
    clock
        Monotonic time source, seconds.
    """

    def __init__(self, hold_s: float, max_documents: int, max_bytes: int,
                 clock: Callable[[], float]) -> None:
        self.hold_s, self.max_documents, self.max_bytes = hold_s, max_documents, max_bytes
        self._clock = clock
        self._held: OrderedDict[int, Held] = OrderedDict()  # arrival number -> held, oldest first
        self._by_key: dict[str, list[int]] = {}
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def waiting_for(self, key: str) -> bool:
        return key in self._by_key

    def hold(self, key: str, name: str, doc: dict[str, Any], reason: str, detail: str,
             since: float | None = None) -> list[Held]:
        """Hold ``doc`` until ``key`` arrives; returns the documents pushed out by the bounds."""
        held = Held(key, name, doc, reason, detail, self._clock() if since is None else since,
                    payload_bytes(doc) if name == "event" else 0)
        n, self._next = self._next, self._next + 1
        self._held[n] = held
        self._by_key.setdefault(key, []).append(n)
        self.nbytes += held.nbytes
        out = []
        while self._held and (len(self._held) > self.max_documents or self.nbytes > self.max_bytes):
            out.append(self._pop(next(iter(self._held))))
        return out

    def release(self, key: str) -> list[Held]:
        """The documents waiting for ``key``, in arrival order (no longer held)."""
        return [self._pop(n) for n in list(self._by_key.get(key, ()))]

    def expired(self) -> list[Held]:
        """The documents held longer than ``hold_s`` (no longer held), in arrival order."""
        now = self._clock()
        if not self._held or now - min(h.since for h in self._held.values()) <= self.hold_s:
            return []
        return [self._pop(n) for n, h in list(self._held.items()) if now - h.since > self.hold_s]

    def _pop(self, n: int) -> Held:
        held = self._held.pop(n)
        waiting = self._by_key[held.key]
        waiting.remove(n)
        if not waiting:
            del self._by_key[held.key]
        self.nbytes -= held.nbytes
        return held
