"""``nanoseg reanalyse`` end to end: a RunEngine's TiledWriter stores a raw run in a real ``tiled
serve``; the command re-runs it through the daemon's path and writes a new analysis run into Tiled,
read back with tiled's client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine

from nanoseg.postprocess import PostprocessConfig
from nanoseg_daemon.contracts import FrameJob
from nanoseg_daemon.ingest_config import DEFAULT_METADATA_KEYS
from nanoseg_daemon.model_slot import load_model
from nanoseg_daemon.pipeline import ProfileBook, analyse_frame
from nanoseg_daemon.run_metadata import metadata_from_start
from nanoseg_daemon.tiled_sink import analysis_runs
from tests.daemon.ingest_fixtures import ImageCamera, blob_detector
from tests.daemon.service_fixtures import DOSE, transmission_frame
from tests.daemon.tiled_fixtures import API_KEY

tiled_client = pytest.importorskip("tiled.client", reason="tiled not installed (pip install -e '.[dev]')")
writing = pytest.importorskip("bluesky_tiled_plugins.writing.tiled_writer",
                              reason="bluesky-tiled-plugins not installed (pip install -e '.[dev]')")


def nanoseg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nanoseg", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_reanalyse_writes_a_new_analysis_run_of_a_finished_run_into_tiled(
        tmp_path: Path, trained_model_path: Path, tiled_url: str) -> None:
    root = tiled_client.from_uri(tiled_url, api_key=API_KEY)
    raw_container = root.create_container("raw_re")
    frames = [transmission_frame(11, i) for i in range(3)]
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(writing.TiledWriter(raw_container))
    cam = ImageCamera(name="cam", frames=np.stack([f.counts for f in frames]))
    (uid,) = RE(bp.count([cam], num=len(frames)), pixel_size_nm=8.0, i0=DOSE, sample="lot 9")

    args = ["reanalyse", uid, "--tiled", tiled_url, "--model", str(trained_model_path),
            "--set", "tiled.raw_path=[raw_re]", "--set", "tiled.path=[analysis_re]",
            "--set", "model.engine=torch", "--set", "model.threads=1", "--set", f"store.state_dir={tmp_path}"]
    done = nanoseg(*args, env={"NANOSEG__TILED__API_KEY": API_KEY})
    assert done.returncode == 0, done.stderr[-2000:]
    key = done.stdout.strip()
    assert "3 frames analysed" in done.stderr

    catalog = root["analysis_re"]
    assert analysis_runs(catalog, uid) == [key]
    run = catalog[key]
    start, stop = run.metadata["start"], run.metadata["stop"]
    assert start["raw_run_uid"] == uid and start["plan_name"] == "nanoseg_analysis"
    assert start["raw_metadata"]["sample"] == "lot 9" and start["processing"]["engine"] == "torch"
    assert (stop["exit_status"], stop["reason"], stop["num_frames"]) == ("success", "", 3)
    assert sorted(run["labels"]) == sorted(run["particles"]) == ["000001", "000002", "000003"]

    # the same path as the daemon: the same frames through analyse_frame give the same particles
    model = load_model(trained_model_path, "torch", "cpu", 1, PostprocessConfig())
    stored = raw_container[uid]["primary"]
    desc_uid = stored.metadata["uid"]
    md, _ = metadata_from_start(raw_container[uid].metadata["start"], DEFAULT_METADATA_KEYS, "flat_field")
    assert md.pixel_size_nm == 8.0
    counts = []
    for k, frame in enumerate(frames):
        image = stored["cam_image"][k]
        np.testing.assert_array_equal(image, frame.counts)  # Tiled keeps the raw frames
        want = analyse_frame(FrameJob(uid, f"{desc_uid}/{k + 1}", k + 1, image, time.time(), md, 0.0),
                             model, ProfileBook("ptychography"))
        labels = run["labels"][f"{k + 1:06d}"]
        table = run["particles"][f"{k + 1:06d}"].read()
        meta: dict[str, Any] = dict(labels.metadata)
        assert meta["frame_uid"] == f"{desc_uid}/{k + 1}"
        assert labels.read().shape == frame.counts.shape and int(labels.read().max()) == len(table)
        assert len(table) == len(want.table) == meta["summary"]["count"]
        np.testing.assert_allclose(table["area_px"].to_numpy(), want.table.columns()["area_px"])
        np.testing.assert_allclose(table["length_nm"].to_numpy(), want.table.columns()["length_nm"], equal_nan=True)
        counts.append(len(table))
    assert sum(counts) > 0


def test_reanalyse_reads_an_ophyd_async_detectors_files_through_tiled(
        tmp_path: Path, trained_model_path: Path, tiled_url: str, tiled_files: Path) -> None:
    root = tiled_client.from_uri(tiled_url, api_key=API_KEY)
    raw_container = root.create_container("raw_async")
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(writing.TiledWriter(raw_container))
    det = blob_detector(tiled_files)  # writes HDF5; Tiled registers the files, the events hold no pixels
    (uid,) = RE(bp.count([det], num=2), pixel_size_nm=8.0)
    done = nanoseg("reanalyse", uid, "--tiled", tiled_url, "--model", str(trained_model_path),
                   "--set", "tiled.raw_path=[raw_async]", "--set", "tiled.path=[analysis_async]",
                   "--set", "model.engine=torch", "--set", "model.threads=1", "--set", f"store.state_dir={tmp_path}",
                   env={"NANOSEG__TILED__API_KEY": API_KEY})
    assert done.returncode == 0, done.stderr[-2000:]
    run = root["analysis_async"][done.stdout.strip()]
    desc_uid = raw_container[uid]["primary"].metadata["uid"]
    assert run.metadata["stop"]["num_frames"] == 2 and run.metadata["stop"]["exit_status"] == "success"
    assert [run["labels"][k].metadata["frame_uid"] for k in ("000001", "000002")] == [f"{desc_uid}/1", f"{desc_uid}/2"]
    assert run["labels"]["000001"].read().shape == (240, 320)


def test_reanalyse_refuses_a_run_tiled_does_not_have(tiled_url: str) -> None:
    done = nanoseg("reanalyse", "no-such-run", "--tiled", tiled_url, env={"NANOSEG__TILED__API_KEY": API_KEY})
    assert done.returncode == 2 and "no-such-run is not in Tiled" in done.stderr and not done.stdout
