"""``nanoseg models export-triton VERSION --repo DIR``: a Triton model repository for a registry version.

Writes ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/<N>/model.onnx`` (onnxruntime backend) and,
where the version has a TensorRT plan, ``DIR/<name>_trt/config.pbtxt`` and
``DIR/<name>_trt/<N>/model.plan`` (``platform: "tensorrt_plan"``). ``N`` is the registry version's
number (v0003 -> 3), the integer version directory Triton expects; ``version_policy`` pins it, so
a re-export after a rollback serves the older number rather than Triton's default "latest".

Batching: the exported graph takes 1 to ``max_batch`` images (``nanoseg.export``), so the config
declares ``max_batch_size: K`` with the dims of one image and ``dynamic_batching``: the server
groups the requests that arrive within ``max_queue_delay_microseconds`` (``--queue-delay-us``)
into batches of up to K, preferring K, across clients and model instances. The graph computes K
images per run whatever the batch (the tracer unrolls Mask R-CNN's per-image loops), so a full
batch is the efficient one. ``--max-batch K`` re-exports the version's verified ``model.pt`` at K
for the onnxruntime model when the registry's graph has another K (registry graphs are exported
at 1, for CPU daemons); the TensorRT variant serves the registered plan, built from the
registry's graph. A registry graph exported before graphs had a batch dimension (static
(1, C, H, W)) is served as before: ``max_batch_size: 0``, full dims, no dynamic batching.
Throughput across streams also comes from model instances (``count`` per GPU, one
``instance_group`` per GPU) and the triton engine's requests in flight.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from nanoseg_training.registry import Registry, RegistryError, onnx_io

DEFAULT_QUEUE_DELAY_US = 2000
"""How long Triton's dynamic batcher waits for more requests to fill a batch, microseconds."""

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _tensor(name: str, spec: dict[str, Any], batched: bool) -> str:
    """One tensor's entry: its dims without the batch dimension when the model batches (a tensor
    of the batch dimension alone is ``dims: [ 1 ]`` reshaped to ``[ ]``, as Triton asks)."""
    shape = spec["shape"][1:] if batched else spec["shape"]
    if any(int(d) < 1 for d in shape):
        raise RegistryError(f"tensor {name}: shape {spec['shape']} is not static; Triton needs explicit dims")
    dims = ", ".join(str(int(d)) for d in shape) or "1"
    reshape = "\n    reshape: { shape: [ ] }" if not shape else ""
    return (f'  {{\n    name: "{name}"\n    data_type: {TRITON_TYPES[spec["dtype"]]}\n    dims: [ {dims} ]{reshape}\n  }}')


def instance_groups(gpus: list[int], count: int, cpu: bool) -> str:
    """One group per GPU (KIND_GPU, ``count`` instances each), or one KIND_CPU group."""
    if cpu:
        return f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_CPU\n  }}\n]"
    groups = ",\n".join(f"  {{\n    count: {count}\n    kind: KIND_GPU\n    gpus: [ {g} ]\n  }}" for g in gpus)
    return f"instance_group [\n{groups}\n]"


def config_pbtxt(name: str, io: dict[str, Any], number: int, gpus: list[int], count: int, cpu: bool,
                 platform: str, cpu_threads: int | None = None, comment: str = "", max_batch: int = 0,
                 queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """A ``config.pbtxt`` for the DetectionCore graph (see the module docstring).

    Parameters
    ----------
    io : dict
        The graph's ``onnx_io`` (``nanoseg_training.registry.onnx_io``); with ``max_batch`` > 0 the
        first dimension of every tensor is the batch.
    max_batch : int
        The graph's ``max_batch`` (``max_batch_size``, dynamic batching on); 0: a batch-1 static
        graph, served without batching.
    queue_delay_us : int
        Dynamic batching's ``max_queue_delay_microseconds``.

    Returns
    -------
    str
    """
    backend = 'platform: "tensorrt_plan"' if platform == "tensorrt_plan" else 'backend: "onnxruntime"'
    batched = max_batch > 0
    inputs = ",\n".join(_tensor(n, s, batched) for n, s in io["inputs"].items())
    outputs = ",\n".join(_tensor(n, s, batched) for n, s in io["outputs"].items())
    params = ""
    if cpu and cpu_threads and platform != "tensorrt_plan":
        # Like nanoseg's OnnxEngine: ORT would size its pool from the host's cores.
        params = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                           for k, v in (("intra_op_thread_count", cpu_threads), ("inter_op_thread_count", 1))) + "\n"
    if batched:
        batching = (f"# The graph takes 1 to {max_batch} images and computes {max_batch}: prefer full batches.\n"
                    f"max_batch_size: {max_batch}\n"
                    f"dynamic_batching {{\n  preferred_batch_size: [ {max_batch} ]\n"
                    f"  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    else:
        batching = ("# Batch-1 static graph: no batch dimension, so no dynamic_batching (needs max_batch_size > 0).\n"
                    "max_batch_size: 0")
    return (f"# {comment}\n" if comment else "") + f"""name: "{name}"
{backend}
{batching}
input [
{inputs}
]
output [
{outputs}
]
{instance_groups(gpus, count, cpu)}
version_policy: {{ specific: {{ versions: [ {number} ] }} }}
{params}"""


def graph_max_batch(onnx_bytes: bytes) -> int:
    """``max_batch`` of an exported graph; 0 for a batch-1 static one (exported before graphs had
    a batch dimension)."""
    from nanoseg.export import max_batch_of, read_onnx_metadata

    dims = onnx_io(onnx_bytes)["inputs"]["image"]["shape"]
    if dims[0] > 0:
        return 0
    return max_batch_of(read_onnx_metadata(onnx_bytes), dims)


def export_triton(reg: Registry, version: str, repo: Path, name: str = "nanoseg", gpus: list[int] | None = None,
                  count: int = 1, cpu: bool = False, cpu_threads: int | None = 2, max_batch: int | None = None,
                  queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> list[Path]:
    """Write the model(s) of ``version`` into ``repo``; returns the config paths written.

    Checksums are verified first; a model directory is rewritten whole (older version
    directories of the same model are removed, so the repository serves exactly ``version``):
    written complete into a hidden temp directory of ``repo``, then renamed into place, so a
    failure part way (disk full, a model.pt that cannot be re-exported) leaves the repository as
    it was.
    ``max_batch``: images per run of the onnxruntime model (None: the registry graph's own; another
    K re-exports the verified ``model.pt`` at K); ``queue_delay_us``: dynamic batching's delay.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) == {"."}:
        raise RegistryError(f"--name {name!r}: a Triton model name is letters, digits, '_', '.' and '-'")
    if repo.exists() and not repo.is_dir():
        raise RegistryError(f"--repo {repo}: exists and is not a directory")
    man = reg.verify(version)
    number = int(man.version[1:])
    src = reg.path(man.version)
    comment = f"nanoseg registry {man.version}, model.pt sha256 {man.artifacts['model.pt'].sha256}"
    registered = (src / "model.onnx").read_bytes()
    variants = [(name, "model.onnx", "onnxruntime")]
    if "model.plan" in man.artifacts and not cpu:
        variants.append((f"{name}_trt", "model.plan", "tensorrt_plan"))
    repo.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []  # (complete temp dir, model dir it becomes)
    try:
        for model_name, artifact, platform in variants:
            tmp = repo / f".{model_name}.{os.getpid()}.tmp"
            staged.append((tmp, repo / model_name))
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / str(number)).mkdir(parents=True)
            data, note = registered, comment
            if platform == "onnxruntime" and max_batch is not None and max_batch != graph_max_batch(registered):
                data, note = _reexport(src / "model.pt", man.version, max_batch), f"{comment}, re-exported at max_batch {max_batch}"
            if platform == "onnxruntime":
                (tmp / str(number) / artifact).write_bytes(data)
            else:
                shutil.copyfile(src / artifact, tmp / str(number) / artifact)
            try:
                io = onnx_io(data)
            except RegistryError as err:
                raise RegistryError(f"{man.version}/model.onnx: {err}; the repository is left as it was") from None
            text = config_pbtxt(model_name, io, number, gpus or [0], count, cpu, platform, cpu_threads,
                                note, graph_max_batch(data), queue_delay_us)
            (tmp / "config.pbtxt").write_text(text)
    except BaseException:
        for tmp, _ in staged:  # the repository keeps what it served before
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tmp, d in staged:
        old = repo / f".{d.name}.{os.getpid()}.old"
        if d.exists():
            os.rename(d, old)
        os.rename(tmp, d)
        shutil.rmtree(old, ignore_errors=True)
    return [d / "config.pbtxt" for _, d in staged]


def _reexport(model_pt: Path, version: str, max_batch: int) -> bytes:
    """The registry's graph of ``model_pt`` (verified), exported at ``max_batch``."""
    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.export import export_checkpoint_onnx

    ckpt = load_checkpoint(model_pt)
    return export_checkpoint_onnx(ckpt, version=f"{ckpt.meta.get('name', model_pt.stem)}@{version}", max_batch=max_batch)
