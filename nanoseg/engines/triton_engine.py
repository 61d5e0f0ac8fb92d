"""Triton engine: prepared model inputs go to a Triton Inference Server over gRPC.

The server runs the same ``DetectionCore`` graph (the registry's ``model.onnx`` in an
``onnxruntime`` model, or its TensorRT plan; see ``nanoseg models export-triton``); tiling before
and post-processing after stay in the caller, so a daemon per beamline stream can share one Triton
cluster. A batch is split into requests of up to the served model's ``max_batch_size`` images
(one for a batch-1 static model, ``max_batch_size: 0``), and up to ``in_flight`` requests are
sent at once from a small thread pool, so one daemon keeps several model instances (or GPUs)
busy and the server's dynamic batcher has requests to group (``nanoseg models export-triton``).

Transient failures (server unavailable, deadline exceeded, overloaded) are retried with
exponential backoff; when the tries are spent, or the model is missing or does not fit, the
caller gets an ``EngineError`` naming the server, the model and the reason.
"""

from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from nanoseg.engines import EngineError, RawDetections, split_outputs
from nanoseg.engines.detection_core import INPUT_NAME, OUTPUT_NAMES
from nanoseg.mask_decoding import MaskDecoding

RETRYABLE = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
                       "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED"})
"""gRPC codes worth another try: the server restarts, is busy or the network dropped a call."""


class TritonTarget(NamedTuple):
    """Where engine ``triton`` runs a model: the server's gRPC address and the model's name."""

    url: str
    """HOST:PORT"""
    model: str


def request_sizes(n: int, in_flight: int, per_request: int) -> list[int]:
    """Images per request when ``n`` images go out as up to ``in_flight`` concurrent requests of
    at most ``per_request`` images each: as even as possible, as few requests as that allows.

    Parameters
    ----------
    n : int
        Images in the batch.
    in_flight : int
        Requests sent at once.
    per_request : int
        The served model's ``max_batch_size`` (1 for a batch-1 static model).

    Returns
    -------
    list of int
        Sizes summing to ``n``, each 1 to ``per_request``.
    """
    if n <= 0:
        return []
    size = min(per_request, math.ceil(n / in_flight))
    count = math.ceil(n / size)
    base, extra = divmod(n, count)
    return [base + 1] * extra + [base] * (count - extra)


class TritonEngine:
    name = "triton"
    mask_decoding = MaskDecoding()
    """Set by ``engine_from_checkpoint`` to the decoding of the graph it built or verified."""

    def __init__(self, url: str, model: str, model_version: str = "", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.25, connect_timeout_s: float = 10.0,
                 in_flight: int = 4) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as err:
            raise EngineError(f"triton: tritonclient[grpc] is not installed ({err}); "
                              "pip install 'nanoseg[triton]'") from None
        self._grpc = grpcclient
        self.url, self.model, self.model_version = url, model, model_version
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.device = f"{url}/{model}"
        self.client = grpcclient.InferenceServerClient(url)
        self._wait_ready(connect_timeout_s)
        meta = self._call("metadata", lambda: self.client.get_model_metadata(
            model, model_version, as_json=True, client_timeout=timeout_s))
        self.input_shape = self._check_io(meta)
        config = self._call("config", lambda: self.client.get_model_config(
            model, model_version, as_json=True, client_timeout=timeout_s))
        self.server_max_batch = int(config.get("config", {}).get("max_batch_size", 0))
        """The served model's ``max_batch_size``; 0: batch-1 static, one image per request."""
        self.in_flight = max(1, in_flight)
        self.max_batch = self.in_flight * max(self.server_max_batch, 1)
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="triton-request")
        self._outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES]

    def _where(self) -> str:
        return f"triton: model {self.model!r} at {self.url}"

    def _wait_ready(self, timeout_s: float) -> None:
        """Wait (polling with backoff) until the server is live and the model is ready."""
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout_s
        delay, reason = self.backoff_s, ""
        while True:
            try:
                if not self.client.is_server_live(client_timeout=self.timeout_s):
                    reason = "server not live"
                elif not self.client.is_model_ready(self.model, self.model_version, client_timeout=self.timeout_s):
                    reason = "model not ready (not loaded, or no such model)"
                else:
                    return
            except InferenceServerException as err:
                reason = f"server unavailable ({err.status()}: {err.message()})"
            if time.monotonic() + delay > deadline:
                raise EngineError(f"{self._where()}: {reason} after {timeout_s:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, 2.0)

    def _call(self, what: str, fn: Any) -> Any:
        """``fn()`` with retries and exponential backoff on transient gRPC errors."""
        from tritonclient.utils import InferenceServerException

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except InferenceServerException as err:
                status = str(err.status())
                if status not in RETRYABLE:
                    raise EngineError(f"{self._where()}: {what} failed ({status}: {err.message()})") from None
                if attempt == self.retries:
                    raise EngineError(f"{self._where()}: {what} failed after {self.retries + 1} tries "
                                      f"({status}: {err.message()})") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _check_io(self, meta: dict[str, Any]) -> tuple[int, int, int]:
        """(C, H, W) of the served model; its tensors must be DetectionCore's."""
        inputs = {t["name"]: t for t in meta.get("inputs", [])}
        outputs = {t["name"] for t in meta.get("outputs", [])}
        if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= outputs:
            raise EngineError(f"{self._where()}: expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}, "
                              f"got {sorted(inputs)} -> {sorted(outputs)}")
        inp = inputs[INPUT_NAME]
        dims = [int(d) for d in inp["shape"]]
        if inp["datatype"] != "FP32" or len(dims) != 4 or dims[0] not in (1, -1) or min(dims[1:]) < 1:
            raise EngineError(f"{self._where()}: input {INPUT_NAME} must be FP32 (1, C, H, W) static, "
                              f"got {inp['datatype']} {dims}")
        return (dims[1], dims[2], dims[3])

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Send the batch as up to ``in_flight`` concurrent gRPC requests (``request_sizes``),
        retrying unavailable or timed-out calls. See ``Engine.infer``.

        ``EngineError`` when the server stays unreachable after the retries or a reply lacks an output.
        """
        x = np.ascontiguousarray(batch, dtype=np.float32)
        per_request = max(self.server_max_batch, 1)
        out: list[RawDetections] = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i: i + self.max_batch]
            bounds = np.cumsum([0, *request_sizes(len(chunk), self.in_flight, per_request)])
            parts = [chunk[a:b] for a, b in itertools.pairwise(bounds)]
            for result in self._pool.map(self._request, parts):  # in order, all in flight at once
                out += result
        return out

    def _request(self, images: np.ndarray) -> list[RawDetections]:
        """One request of 1 to ``server_max_batch`` images (exactly 1 for a batch-1 static model)."""
        inp = self._grpc.InferInput(INPUT_NAME, list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        result = self._call("inference", lambda: self.client.infer(
            self.model, [inp], self.model_version, outputs=self._outputs, client_timeout=self.timeout_s))
        boxes, scores, masks, num = (result.as_numpy(n) for n in OUTPUT_NAMES)
        if num is None or masks is None:
            raise EngineError(f"{self._where()}: reply lacks outputs {list(OUTPUT_NAMES)}")
        return split_outputs(boxes, scores, masks, num.reshape(-1))

    def close(self) -> None:
        """Finish the requests in flight and close the gRPC client."""
        self._pool.shutdown(wait=True)
        self.client.close()
