"""Raw bluesky runs read back from Tiled: for a daemon that joined late, and for ``nanoseg reanalyse``.

A RunEngine's ``TiledWriter`` (bluesky-tiled-plugins) stores a run as a container keyed by its
start uid, metadata ``start`` (and ``stop`` once it ended), one container per stream whose metadata
is that stream's descriptor without ``name``, ``run_start`` and ``object_keys`` (further
descriptors of the same stream in ``_config_updates``), and per data key an array (events' inline
data, first axis the event) or a node over the detector's files (stream resources).
``read_run`` and ``run_with_descriptor`` give back the start and the descriptors as documents,
which the router takes as if they had come over the wire; ``raw_frames`` yields the events of a
finished run with their images, for a reanalysis through the same router.

``TiledRunLookup`` runs those lookups on a thread of its own, so a slow or absent server never
stalls ingest: the router asks (``request``) and collects the answers (``results``) between
messages. tiled is an optional dependency (``pip install 'nanoseg[tiled]'``), imported on use.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nanoseg_daemon.config import TiledSection
from nanoseg_daemon.logs import log

LookupKind = Literal["run", "descriptor"]


@dataclass(frozen=True)
class RawRun:
    """A raw run as Tiled holds it: its start, its descriptors (documents), whether it stopped."""

    start: dict[str, Any]
    descriptors: list[dict[str, Any]]
    stopped: bool
    node: Any  # the tiled client node of the run


def connect(cfg: TiledSection, path: Sequence[str]) -> Any:
    """The tiled client container at ``path`` (keys from the server's root); KeyError if absent."""
    from tiled.client import from_uri

    node = from_uri(cfg.uri, api_key=cfg.api_key, timeout=cfg.timeout_s)
    for key in path:
        node = node[key]
    return node


def _streams(run_node: Any) -> list[tuple[str, Any]]:
    """(name, container) of the run's streams (containers whose metadata holds data_keys)."""
    return [(name, node) for name, node in run_node.items() if "data_keys" in (node.metadata or {})]


def descriptors_of(run_node: Any, start_uid: str) -> list[dict[str, Any]]:
    """The descriptor documents of a run stored by TiledWriter, oldest first.

    Parameters
    ----------
    run_node
        The run's tiled container.
    start_uid
        The run's start uid (each descriptor's ``run_start``).

    Returns
    -------
    list of dict
        One descriptor per stream, then one per configuration update (same data keys, their own
        uid, time and configuration), sorted by time.
    """
    out = []
    for name, node in _streams(run_node):
        md = copy.deepcopy(dict(node.metadata))
        updates = md.pop("_config_updates", [])
        desc = {**md, "name": name, "run_start": start_uid}
        desc.setdefault("configuration", {})
        out.append(desc)
        for update in updates:
            out.append({**desc, "uid": update["uid"], "time": update["time"],
                        "configuration": update.get("configuration", desc["configuration"])})
    return sorted(out, key=lambda d: float(d.get("time", 0.0)))


def read_run(container: Any, run_uid: str) -> RawRun | None:
    """The raw run ``run_uid`` from ``container`` (None if Tiled has no such run)."""
    if run_uid not in container:
        return None
    node = container[run_uid]
    md = node.metadata
    if "start" not in md:
        return None
    start = copy.deepcopy(dict(md["start"]))
    return RawRun(start, descriptors_of(node, start["uid"]), md.get("stop") is not None, node)


def run_with_descriptor(container: Any, descriptor_uid: str, recent: int) -> RawRun | None:
    """The run, among the ``recent`` newest of ``container``, one of whose descriptors is
    ``descriptor_uid`` (an event names its descriptor, not its run); None if none is."""
    for key, node in container.items()[-1:-recent - 1:-1]:
        for _, stream in _streams(node):
            md = stream.metadata
            if md.get("uid") == descriptor_uid or any(u.get("uid") == descriptor_uid
                                                     for u in md.get("_config_updates", [])):
                return read_run(container, key)
    return None


def raw_frames(run: RawRun, image_key: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events of a finished run, one per stored row, with the image filled in, stream by stream.

    Rows of a stream are read one at a time (a frame, not the whole run, in memory). Tiled keeps
    no event uids: each event's uid is ``<descriptor uid>/<seq_num>``, as the daemon names frames
    read through stream datums. Streams without an image key (``image_key``, or the data key the
    descriptor declares an image) yield nothing.
    """
    from nanoseg_daemon.image_fields import is_image_data_key

    for desc in run.descriptors:
        if desc["uid"] != run.node[desc["name"]].metadata.get("uid"):
            continue  # a configuration update: its rows are the stream's, yielded once
        keys = desc["data_keys"]
        key = image_key if image_key in keys else next((k for k, v in keys.items() if is_image_data_key(v)), None)
        stream = run.node[desc["name"]]
        if key is None or key not in stream:
            continue
        images = stream[key]
        seq = stream["seq_num"].read() if "seq_num" in stream else range(1, images.shape[0] + 1)
        times = stream["time"].read() if "time" in stream else [run.start["time"]] * images.shape[0]
        for row in range(images.shape[0]):
            seq_num, t = int(seq[row]), float(times[row])
            yield "event", {"uid": f"{desc['uid']}/{seq_num}", "descriptor": desc["uid"], "seq_num": seq_num,
                            "time": t, "data": {key: images[row]}, "timestamps": {key: t}, "filled": {key: True}}


@dataclass(frozen=True)
class LookupResult:
    kind: LookupKind
    uid: str
    run: RawRun | None
    error: str = ""  # why the lookup failed (server unreachable, refused); "" when it was answered


class TiledRunLookup:
    """Lookups of raw runs in Tiled on a background thread (see module).

    Parameters
    ----------
    cfg
        The ``tiled`` config section: server, key, ``raw_path`` (where the raw runs are) and
        ``recover_recent_runs`` (how many of the newest runs an unknown descriptor is looked for in).
    """

    def __init__(self, cfg: TiledSection) -> None:
        self.cfg = cfg
        self._requests: queue.Queue[tuple[LookupKind, str] | None] = queue.Queue()
        self._results: queue.Queue[LookupResult] = queue.Queue()
        self._container: Any = None
        self._thread = threading.Thread(target=self._loop, name="nanoseg-tiled-lookup", daemon=True)
        self._thread.start()

    def request(self, kind: LookupKind, uid: str) -> None:
        """Ask for the run ``uid`` (kind ``run``) or the run of descriptor ``uid``; never blocks."""
        self._requests.put((kind, uid))

    def results(self) -> list[LookupResult]:
        """The answers that came since the last call."""
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def close(self, timeout: float = 5.0) -> None:
        self._requests.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._requests.get()) is not None:
            kind, uid = item
            self._results.put(self._lookup(kind, uid))

    def _lookup(self, kind: LookupKind, uid: str) -> LookupResult:
        try:
            if self._container is None:
                self._container = connect(self.cfg, self.cfg.raw_path)
            if kind == "run":
                run = read_run(self._container, uid)
            else:
                run = run_with_descriptor(self._container, uid, self.cfg.recover_recent_runs)
            return LookupResult(kind, uid, run)
        except Exception as err:  # unreachable, refused, an odd layout: the documents are counted instead
            self._container = None
            log("tiled_lookup_failed", logging.WARNING, kind=kind, uid=uid, error=f"{type(err).__name__}: {err}"[:300])
            return LookupResult(kind, uid, None, f"{type(err).__name__}: {err}"[:300])
