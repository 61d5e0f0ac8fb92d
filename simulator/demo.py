"""``nanoseg demo``: the whole loop on one machine, then a report.

1. a bluesky 0MQ proxy (``bluesky-0MQ-proxy``, a child process);
2. the daemon (``nanoseg serve --config configs/daemon/demo.yaml``, a child process) subscribed to
   the proxy, publishing its analysis runs back into it and its JSON summaries on its own socket;
3. in this process: a RunEngine with the simulated microscope (configs/simulator/growth.yaml)
   publishing through bluesky's Publisher, ``NanosegStats`` reading the daemon's summaries, and
   the ``monitor_growth`` plan, which stops at the target mean length or when growth stalls;
   a live table prints one row per analysed frame; the daemon's analysis documents (masks,
   growth alarms) are collected from the proxy;
4. the report in the output folder: ``frames.csv``, ``truth.json``/``truth.csv``,
   ``summary.json``, ``growth.png`` (statistics over time against the truth), ``last_frame.png``
   (the last frame with its masks), the children's logs and the daemon's result store.

Every port is chosen free (and distinct) at start. Every child is stopped on exit, also on failure, Ctrl-C or
SIGTERM. Exit status 0 when the run finished and every frame was analysed; otherwise non-zero
with one line saying what failed.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nanoseg.config_io import ConfigError
from nanoseg_sim.live import AnalysisListener, LiveTable


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def first_ephemeral_port() -> int:
    """The first port of the kernel's range for the local ports of outgoing connections (Linux; a
    default elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free now, for servers started next.

    Chosen below the kernel's ephemeral range, so the local port of some process's outgoing
    connection (a ZMQ socket connecting to one of them, say) cannot take one before its server
    binds it, and each is held until all are chosen, so no two are the same port. Falls back to
    the kernel's choice (port 0) where no port below the range is free.
    """
    first_ephemeral = first_ephemeral_port()
    below = range(max(1024, first_ephemeral - 12000), first_ephemeral)
    candidates = random.sample(below, k=min(4 * count + 64, len(below)))
    held: list[socket.socket] = []
    try:
        for port in [*candidates, *([0] * count)]:
            if len(held) == count:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        if len(held) < count:
            raise OSError(f"could not find {count} free TCP ports on 127.0.0.1")
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the demo dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Children:
    """Child processes started by the demo; ``stop_all`` ends each (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        f = log.open("wb")
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        f.close()
        self.procs.append((name, proc, log))
        return proc

    def check(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}; last lines of {log}:\n{tail(log)}")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for _name, proc, _log in reversed(self.procs):
            self.stop(proc)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(check: Callable[[], bool], timeout: float, what: str, children: Children) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children.check()
        if check():
            return
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_demo(args: argparse.Namespace) -> int:
    from nanoseg.control_client import control_request
    from nanoseg.paths import REPO_ROOT

    t_start = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = ("proxy_in", "proxy_out", "summary", "control", "metrics")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    addr = {k: f"tcp://127.0.0.1:{p}" for k, p in ports.items()}
    daemon_sets = {
        "ingest.bluesky.address": addr["proxy_out"], "ingest.raw.enabled": "false",
        "publish.bluesky.address": addr["proxy_in"], "publish.summary.address": addr["summary"],
        "control.address": addr["control"], "metrics.port": str(ports["metrics"]),
        "store.state_dir": str(out / "state"),
    }
    if args.model:  # else the daemon config's (a missing one stops the daemon, naming model.path)
        model = Path(args.model).resolve()
        if not model.is_file():
            raise DemoError(f"the model {model} is missing (models/default/model.pt ships with the repository; "
                            f"or pass --model PATH)")
        daemon_sets["model.path"] = str(model)
    if args.engine:
        daemon_sets["model.engine"] = args.engine
    from nanoseg_sim.run import Simulation, TruthRecorder, load_simulator_config, make_publisher

    sim_sets = {"publish.proxy": addr["proxy_in"], "monitor.summary_address": addr["summary"],
                **dict(s.split("=", 1) for s in (args.set or []))}
    if args.max_frames:
        sim_sets["monitor.max_frames"] = str(args.max_frames)
    sim_cfg = load_simulator_config(args.simulator_config, sim_sets)
    if sim_cfg.mode != "growth":
        raise DemoError(f"{args.simulator_config}: the demo runs a growth series (mode: growth)")

    children = Children()
    listener: AnalysisListener | None = None
    stats = None
    pub = None
    try:
        say(f"output folder {out}")
        bin_dir = Path(sys.executable).parent
        proxy_cmd = str(bin_dir / "bluesky-0MQ-proxy")
        children.start("bluesky-0MQ-proxy", [proxy_cmd, "--in-address", addr["proxy_in"],
                                             "--out-address", addr["proxy_out"]], out / "proxy.log")
        wait_until(lambda: _listening(ports["proxy_in"]) and _listening(ports["proxy_out"]), 30,
                   "the bluesky 0MQ proxy", children)
        say(f"bluesky 0MQ proxy up: in {addr['proxy_in']}, out {addr['proxy_out']}")
        daemon_argv = [sys.executable, "-m", "nanoseg", "serve", "--config", str(args.daemon_config)]
        for k, v in daemon_sets.items():
            daemon_argv += ["--set", f"{k}={v}"]
        t0 = time.monotonic()
        daemon = children.start("the daemon (nanoseg serve)", daemon_argv, out / "daemon.log")
        say(f"starting the daemon (config {args.daemon_config})")
        wait_until(lambda: _ready(ports["metrics"]), args.startup_timeout, "the daemon to become ready", children)
        status = control_request(addr["control"], {"command": "status"})
        if not status.get("ok"):
            raise DemoError(f"the daemon's status request failed: {status.get('error')}")
        engine, model = status["result"]["model"]["engine"], Path(status["result"]["model"]["path"])
        say(f"daemon ready in {time.monotonic() - t0:.1f} s: {engine} engine, model "
            f"{model.relative_to(REPO_ROOT) if model.is_relative_to(REPO_ROOT) else model} "
            f"(metrics http://127.0.0.1:{ports['metrics']}/metrics)")

        from nanoseg_daemon.ophyd_stats import NanosegStats
        from nanoseg_sim.run import run_engine

        listener = AnalysisListener(addr["proxy_out"])
        sim = Simulation.build(sim_cfg)
        stats = NanosegStats(addr["summary"], name="nanoseg")
        stats.timeout_s.put(sim_cfg.monitor.timeout_s)
        RE = run_engine(interactive=False)
        truth = TruthRecorder()
        RE.subscribe(truth)
        pub = make_publisher(addr["proxy_in"], sim_cfg.publish.prefix, sim_cfg.publish.serializer,
                             max(sim_cfg.publish.connect_wait_s, 0.5))
        RE.subscribe(pub)
        m = sim_cfg.monitor
        say(f"growth run: up to {m.max_frames} frames, {sim_cfg.growth.interval_s:g} s of growth apart; stop at "
            f"mean length {m.target_mean_length_nm:g} nm or below {m.stall_rate_nm_per_frame:g} nm/frame "
            f"for {m.stall_frames} frames")
        table = LiveTable(listener)
        RE.subscribe(table)
        RE.subscribe(lambda _n, d: listener.follow(d["uid"]) if listener is not None else None, "start")
        t_run = time.monotonic()
        try:
            RE(sim.monitor_plan(stats))
        except Exception as err:
            children.check()
            raise DemoError(f"the growth plan failed: {type(err).__name__}: {err}") from None
        run_s = time.monotonic() - t_run
        raw_uid = truth.run_uid
        stop = truth.stop_doc or {}
        if raw_uid is None or stop.get("exit_status") != "success":
            raise DemoError(f"the growth run did not finish: {stop.get('exit_status')} {stop.get('reason', '')}")
        wait_until(lambda: listener is not None and listener.stop_doc is not None, 60,
                   "the daemon's analysis run to stop", children)
        say(f"run finished after {len(truth.rows)} frames in {run_s:.1f} s: {stop.get('reason')}")
        rc = children.stop(daemon)
        if rc != 0:
            raise DemoError(f"the daemon exited with status {rc} on SIGTERM; see {out / 'daemon.log'}")
        analysed = len(listener.events)
        if analysed != len(truth.rows) or len(table.rows) != len(truth.rows):
            raise DemoError(f"{len(truth.rows)} frames acquired but {analysed} analysis events and "
                            f"{len(table.rows)} stats readings received")
        write_report(out, sim, truth, table, listener, stop, run_s, time.monotonic() - t_start,
                     engine)
        return 0
    finally:
        if pub is not None:
            pub.close()
        if stats is not None:
            stats.close()
        if listener is not None:
            listener.close()
        children.stop_all()


def write_report(out: Path, sim: Any, truth: Any, table: LiveTable, listener: AnalysisListener,
                 stop: dict[str, Any], run_s: float, total_s: float, engine: str) -> None:
    from nanoseg.masks import decode_rle
    from nanoseg_daemon.plans import GrowthStop
    from nanoseg_sim.report import (
        plot_frame_with_masks,
        plot_growth,
        score,
        write_json,
        write_table,
    )
    from nanoseg_sim.sample import i0_counts

    truth.write(out)
    rows = table.rows
    write_table(rows, out / "frames.csv")
    m = sim.cfg.monitor
    replay = GrowthStop(m.target_mean_length_nm, m.stall_rate_nm_per_frame, m.stall_frames, m.smoothing)
    for r in rows:
        replay.update(r["length_nm_mean"])
    plot_growth(rows, out / "growth.png", target_nm=m.target_mean_length_nm, smoothed_nm=replay.smoothed,
                alarms=listener.alarms)
    last = max(listener.events)
    ev = listener.events[last]
    masks_rle = json.loads(ev["masks"])
    frame = sim.microscope.camera.last_frame
    shape = frame.shape
    masks = np.stack([decode_rle(r) for r in masks_rle]) if masks_rle else np.zeros((0, *shape), bool)
    det = sim.cfg.detector
    plot_frame_with_masks(frame, masks, out / "last_frame.png",
                          i0=i0_counts(det, float(sim.microscope.camera.exposure_time.get())),
                          dark=det.dark_counts,
                          title=f"frame {last}: {ev['count']} particles (truth {rows[-1]['truth_count']})")
    sc = score(rows)
    summary = {
        "raw_run_uid": truth.run_uid, "analysis_run_uid": (listener.start_doc or {}).get("uid"),
        "stop_reason": stop.get("reason"), "frames": len(rows), "model_version": rows[-1].get("model_version"),
        "engine": engine, "run_seconds": round(run_s, 1), "total_seconds": round(total_s, 1),
        "seconds_per_frame": round(run_s / max(len(rows), 1), 3), "score": sc,
        "final": {k: rows[-1].get(k) for k in ("count", "truth_count", "length_nm_mean",
                                                "truth_visible_length_nm_mean", "width_nm_mean", "coverage_fraction")},
        "target_mean_length_nm": m.target_mean_length_nm,
        "alarms": [{k: a[k] for k in ("rule", "state", "raw_seq_num", "value", "message")} for a in listener.alarms],
        "files": ["frames.csv", "truth.json", "truth.csv", "growth.png", "last_frame.png", "daemon.log",
                  "proxy.log", "state/"],
    }
    write_json(summary, out / "summary.json")
    say(f"stopped because: {stop.get('reason')}; final mean length {rows[-1]['length_nm_mean']:.0f} nm "
        f"(truth {rows[-1]['truth_visible_length_nm_mean']:.0f} nm), {rows[-1]['count']} particles "
        f"(truth {rows[-1]['truth_count']})")
    if "count_mae" in sc:
        say(f"score: count within tolerance on {100 * sc['count_within']:.0f} % of frames (mean |error| "
            f"{sc['count_mae']:.2f}); mean length error {100 * sc.get('length_rel_error', float('nan')):+.1f} %")
    say(f"{len(listener.alarms)} alarm event(s); {len(rows)} frames, {run_s / max(len(rows), 1):.2f} s per frame, "
        f"{total_s:.0f} s in all")
    say(f"report: {out}/summary.json, frames.csv, growth.png, last_frame.png")


def cmd_demo(args: argparse.Namespace) -> int:
    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run_demo(args)
    except DemoError as err:
        print(f"nanoseg demo: FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as err:
        print(f"nanoseg demo: FAILED: configuration: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("nanoseg demo: interrupted; every process it started has been stopped", file=sys.stderr, flush=True)
        return 130
