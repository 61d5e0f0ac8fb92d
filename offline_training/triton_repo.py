"""``nanoseg models export-triton VERSION --repo DIR``: a Triton model repository for a registry version.

Writes ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/<N>/model.onnx`` (onnxruntime backend) and,
where the version has a TensorRT plan, ``DIR/<name>_trt/config.pbtxt`` and
``DIR/<name>_trt/<N>/model.plan`` (``platform: "tensorrt_plan"``). ``N`` is the registry version's
number (v0003 -> 3), the integer version directory Triton expects; ``version_policy`` pins it, so
a re-export after a rollback serves the older number rather than Triton's default "latest".

Why ``max_batch_size: 0``: the exported graph is batch-1 static, input (1, C, H, W) and outputs
(1, K, ...), because batch > 1 exports of torchvision Mask R-CNN are wrong or fail (the traced
per-image loop is unrolled for one image; pytorch/vision #2309, #2311). Triton's onnxruntime
backend only batches models whose first dimension is variable, so the config declares the full
dims with no batch dimension and no ``dynamic_batching`` (it needs ``max_batch_size`` > 0).
Throughput across streams comes from model instances (``count`` per GPU, one ``instance_group``
per GPU) and concurrent requests from many daemons.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nanoseg_training.registry import Registry, RegistryError

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _tensor(name: str, spec: dict[str, Any]) -> str:
    if any(int(d) < 1 for d in spec["shape"]):
        raise RegistryError(f"tensor {name}: shape {spec['shape']} is not static; Triton needs explicit dims")
    dims = ", ".join(str(int(d)) for d in spec["shape"])
    return f'  {{\n    name: "{name}"\n    data_type: {TRITON_TYPES[spec["dtype"]]}\n    dims: [ {dims} ]\n  }}'


def instance_groups(gpus: list[int], count: int, cpu: bool) -> str:
    """One group per GPU (KIND_GPU, ``count`` instances each), or one KIND_CPU group."""
    if cpu:
        return f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_CPU\n  }}\n]"
    groups = ",\n".join(f"  {{\n    count: {count}\n    kind: KIND_GPU\n    gpus: [ {g} ]\n  }}" for g in gpus)
    return f"instance_group [\n{groups}\n]"


def config_pbtxt(name: str, io: dict[str, Any], number: int, gpus: list[int], count: int, cpu: bool,
                 platform: str, cpu_threads: int | None = None, comment: str = "") -> str:
    """A ``config.pbtxt`` for the batch-1 static DetectionCore graph (see the module docstring)."""
    backend = 'platform: "tensorrt_plan"' if platform == "tensorrt_plan" else 'backend: "onnxruntime"'
    inputs = ",\n".join(_tensor(n, s) for n, s in io["inputs"].items())
    outputs = ",\n".join(_tensor(n, s) for n, s in io["outputs"].items())
    params = ""
    if cpu and cpu_threads and platform != "tensorrt_plan":
        # Like nanoseg's OnnxEngine: ORT would size its pool from the host's cores.
        params = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                           for k, v in (("intra_op_thread_count", cpu_threads), ("inter_op_thread_count", 1))) + "\n"
    return (f"# {comment}\n" if comment else "") + f"""name: "{name}"
{backend}
# Batch-1 static graph: no batch dimension, so no dynamic_batching (needs max_batch_size > 0).
max_batch_size: 0
input [
{inputs}
]
output [
{outputs}
]
{instance_groups(gpus, count, cpu)}
version_policy: {{ specific: {{ versions: [ {number} ] }} }}
{params}"""


def export_triton(reg: Registry, version: str, repo: Path, name: str = "nanoseg", gpus: list[int] | None = None,
                  count: int = 1, cpu: bool = False, cpu_threads: int | None = 2) -> list[Path]:
    """Write the model(s) of ``version`` into ``repo``; returns the config paths written.

    Checksums are verified first; a model directory is rewritten whole (older version
    directories of the same model are removed, so the repository serves exactly ``version``).
    """
    man = reg.verify(version)
    number = int(man.version[1:])
    src = reg.path(man.version)
    comment = f"nanoseg registry {man.version}, model.pt sha256 {man.artifacts['model.pt'].sha256}"
    variants = [(name, "model.onnx", "onnxruntime")]
    if "model.plan" in man.artifacts and not cpu:
        variants.append((f"{name}_trt", "model.plan", "tensorrt_plan"))
    written = []
    for model_name, artifact, platform in variants:
        d = repo / model_name
        if d.exists():
            shutil.rmtree(d)
        (d / str(number)).mkdir(parents=True)
        shutil.copyfile(src / artifact, d / str(number) / artifact)
        text = config_pbtxt(model_name, man.onnx_io, number, gpus or [0], count, cpu, platform, cpu_threads, comment)
        (d / "config.pbtxt").write_text(text)
        written.append(d / "config.pbtxt")
    return written
