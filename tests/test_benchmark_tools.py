"""Helpers of the benchmarks that compute a figure themselves (not the benchmarks' runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from nanoseg.paths import REPO_ROOT


def test_gil_share_counts_each_threads_samples_as_ms_per_frame(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from gil_share import held_ms

    rec = tmp_path / "gil.txt"
    rec.write_text(
        "thread (11): stage-prepare;Thread.run (/usr/lib/python3.11/threading.py:982);"
        "prepare (/x/daemon/pipeline.py:141);check_input (/x/nanoseg/input_check.py:86) 30\n"
        "thread (11): stage-prepare;Thread.run (/usr/lib/python3.11/threading.py:982);"
        "prepare (/x/daemon/pipeline.py:141) 10\n"
        "thread (12): stage-output;Thread.run (/usr/lib/python3.11/threading.py:982) 20\n"
    )
    threads, functions = held_ms(rec, rate_hz=100.0, frames=40)  # one sample: 10 ms over 40 frames
    assert threads == {"stage-prepare": 10.0, "stage-output": 5.0}
    assert functions["stage-prepare"] == {"prepare (pipeline.py:141)": 10.0, "check_input (input_check.py:86)": 7.5}
    assert dict(functions["stage-output"]) == {}  # the threading frames every sample shares are left out
