"""A real Triton Inference Server (pytriton's bundled ``tritonserver``) serving the nanoseg ONNX.

Runs in the pytriton environment (``scripts/setup_pytriton.sh``: it pins numpy<2, so not in
.venv), with the work tree on PYTHONPATH and LD_LIBRARY_PATH at the interpreter's library
directory::

    python tests/nanoseg/pytriton_server.py --onnx model.onnx --model nanoseg \\
        --grpc-port P --http-port Q --metrics-port R [--threads 1]
    python tests/nanoseg/pytriton_server.py --repo DIR --grpc-port P --http-port Q --metrics-port R

With ``--repo`` it runs the bundled ``tritonserver`` binary itself on a model repository (as
``nanoseg models export-triton`` writes one), set up the way pytriton sets it up (server tree
copied, the Python-backend stub of this interpreter's version, the wheel's libraries on
LD_LIBRARY_PATH, this environment's site-packages on PYTHONPATH for the stub).

The served model (``--onnx``) is unbatched (``max_batch_size: 0``): input ``image`` FP32
(-1, C, H, W), outputs ``boxes`` (-1, K, 4), ``scores`` (-1, K), ``mask_probs`` (-1, K, M, M)
FP32 and ``num_detections`` (-1,) INT64, the graph's batch dimension left variable;
the inference function runs the ONNX in ONNX Runtime with the session options of
``nanoseg.engines.onnx_engine`` (Python backend: the bundled server has no onnxruntime backend).
No torch in this environment, so tensor names come from the ONNX file, not from nanoseg.
Prints ``READY`` once the model is loaded, stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def onnx_session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def serve_repository(args: argparse.Namespace) -> int:
    """Run the bundled tritonserver on ``args.repo`` (Python backend only: no onnxruntime backend)."""
    import pytriton
    from pytriton.utils.distribution import get_libs_path, get_stub_path

    dist = Path(pytriton.__file__).parent / "tritonserver"
    work = Path(tempfile.mkdtemp(prefix="nanoseg-tritonserver-"))
    server = work / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                server / "backends" / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH"), str(get_libs_path())) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = ":".join(p for p in (sysconfig.get_paths()["purelib"], env.get("PYTHONPATH")) if p)
    cmd = [str(server / "bin" / "tritonserver"), f"--model-repository={args.repo}",
           f"--backend-directory={server / 'backends'}", f"--cache-directory={server / 'caches'}",
           "--http-address=127.0.0.1", f"--http-port={args.http_port}", "--grpc-address=127.0.0.1",
           f"--grpc-port={args.grpc_port}", "--metrics-address=127.0.0.1", f"--metrics-port={args.metrics_port}",
           "--backend-config=python,shm-default-byte-size=4194304", "--exit-on-error=true"]
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    signal.signal(signal.SIGINT, lambda *_: proc.terminate())
    print("STARTED", flush=True)
    try:
        return proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dims(shape: list) -> tuple[int, ...]:
    """An ONNX tensor's shape for Triton: -1 where the graph names a dimension (the batch)."""
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx")
    ap.add_argument("--repo", help="serve this model repository with the bundled tritonserver")
    ap.add_argument("--model", default="nanoseg")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.repo:
        return serve_repository(args)
    if not args.onnx:
        ap.error("--onnx or --repo is required")

    session = onnx_session(args.onnx, args.threads)
    (inp,) = session.get_inputs()
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    dtypes = {o.name: np.int64 if o.type == "tensor(int64)" else np.float32 for o in outputs}

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        replies = []
        for req in requests:
            image = np.ascontiguousarray(req[inp.name], dtype=np.float32)
            values = session.run(names, {inp.name: image})
            replies.append({n: np.asarray(v, dtypes[n]) for n, v in zip(names, values)})
        return replies

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    config = TritonConfig(http_address="127.0.0.1", grpc_address="127.0.0.1", http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_address="127.0.0.1",
                          metrics_port=args.metrics_port)
    # Loopback test server: no access token on the statistics and repository endpoints (the
    # benchmark reads the server's own timings).
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(
            model_name=args.model, infer_func=infer,
            inputs=[Tensor(name=inp.name, dtype=np.float32, shape=dims(inp.shape))],
            outputs=[Tensor(name=o.name, dtype=dtypes[o.name], shape=dims(o.shape)) for o in outputs],
            config=ModelConfig(batching=False),
            strict=True,
        )
        triton.run()
        print("READY", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
