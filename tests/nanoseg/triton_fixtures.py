"""A real Triton Inference Server on loopback, in a child process of the test.

The server runs in the pytriton environment (``scripts/setup_pytriton.sh``; nvidia-pytriton pins
numpy<2, so it is not installed in .venv), found at ``$NANOSEG_PYTRITON_PYTHON`` or
``<cache>/pytriton-venv/bin/python``. The child's LD_LIBRARY_PATH points at that interpreter's
library directory: otherwise the Python-backend stub links Debian's older libpython3.11 and fails
to load the model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from nanoseg.paths import REPO_ROOT, cache_dir
from nanoseg_sim.demo import free_ports

SERVER_SCRIPT = Path(__file__).with_name("pytriton_server.py")


def pytriton_python() -> tuple[Path | None, str]:
    """(interpreter, "") of the pytriton environment, or (None, why it is unusable)."""
    py = Path(os.environ.get("NANOSEG_PYTRITON_PYTHON") or cache_dir() / "pytriton-venv" / "bin" / "python")
    if not py.exists():
        return None, f"no pytriton environment at {py}: run scripts/setup_pytriton.sh"
    probe = subprocess.run([str(py), "-c", "import pytriton, onnxruntime"], capture_output=True, text=True)
    if probe.returncode:
        return None, f"{py} cannot import pytriton/onnxruntime: {probe.stderr.strip()[-300:]}"
    return py, ""


class TritonServer:
    """``pytriton_server.py`` in its own session (so stopping it ends tritonserver too)."""

    def __init__(self, python: Path, log_path: Path, *, onnx: Path | None = None, repo: Path | None = None,
                 model: str = "nanoseg", threads: int = 1) -> None:
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.model = model
        self.log_path = log_path
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env = {**os.environ, "LD_LIBRARY_PATH": libdir, "PYTHONPATH": str(REPO_ROOT),
               "OMP_NUM_THREADS": str(threads)}
        cmd = [str(python), str(SERVER_SCRIPT), "--grpc-port", str(self.grpc_port), "--http-port",
               str(self.http_port), "--metrics-port", str(self.metrics_port)]
        cmd += ["--onnx", str(onnx), "--model", model, "--threads", str(threads)] if onnx else ["--repo", str(repo)]
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def log_errors(self) -> str:
        """The server's error lines (``E1126 ...``, ``error: ...``) and the end of its log."""
        lines = self.log_path.read_text("utf-8", "replace").splitlines()
        errors = [ln for ln in lines if (ln[:1] == "E" and ln[1:2].isdigit()) or ln.lower().startswith("error")]
        return "\n".join(errors) + "\n...\n" + self.log_tail(1500)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until the model answers is_model_ready over gRPC; raises with the server's log otherwise."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Triton exited with {self.proc.returncode}:\n{self.log_errors()}")
                try:
                    if client.is_model_ready(self.model, client_timeout=2.0):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
            raise TimeoutError(f"Triton model {self.model} not ready within {timeout_s} s:\n{self.log_errors()}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's session only
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


PYTHON_BACKEND_MODEL = '''"""Python-backend stand-in for the onnxruntime backend: runs this version's model.onnx."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        onnx = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]

    def execute(self, requests):
        replies = []
        for request in requests:
            feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            values = self.session.run(self.outputs, feed)
            replies.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(v))
                                                       for n, v in zip(self.outputs, values)]))
        return replies
'''


def python_backend_variant(repo: Path, out: Path) -> Path:
    """A copy of an export-triton repository whose onnxruntime models run on the Python backend.

    Everything else of each ``config.pbtxt`` (names, dims, types, max_batch_size, instance
    groups, version policy) and the version directories stay as written; only the ``backend``
    line changes and a ``model.py`` that runs the same ``model.onnx`` joins it.
    """
    shutil.copytree(repo, out)
    for cfg in out.glob("*/config.pbtxt"):
        text = cfg.read_text()
        if 'backend: "onnxruntime"' not in text:
            continue
        cfg.write_text(text.replace('backend: "onnxruntime"', 'backend: "python"'))
        for version_dir in cfg.parent.iterdir():
            if version_dir.is_dir() and (version_dir / "model.onnx").exists():
                (version_dir / "model.py").write_text(PYTHON_BACKEND_MODEL)
    return out
