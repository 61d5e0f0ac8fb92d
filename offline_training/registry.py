"""The model registry: a directory of immutable, checksummed model versions and a ``current`` pointer.

Layout::

    REGISTRY/
      versions/v0001/model.pt        the nanoseg checkpoint, byte for byte as registered
                    model.onnx       exported at registration (what Triton and ONNX Runtime serve)
                    model.plan       TensorRT plan, only where one was built (on a GPU host)
                    manifest.json    sha256 and size of each artifact, model, data, evaluations
      current -> versions/v0003      symlink, switched atomically (os.replace of a temp symlink)
      history.jsonl                  register / promote / rollback, one JSON line each, append-only
      evaluations/                   evaluation reports of promotions
      .lock                          flock: one writer at a time

Artifacts are made read-only once written. A checksum or size mismatch is reported as corruption
and nothing is loaded from that version (``Registry.verify`` runs before every load).
Promotion and rollback (evaluation gate, daemon notification) are in ``nanoseg_training.promotion``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from nanoseg.checkpoint import Checkpoint, file_sha256, load_checkpoint
from nanoseg.config_io import ConfigError, StrictModel, format_validation_error
from nanoseg.paths import cache_dir

MANIFEST_FORMAT: Literal["nanoseg-registry-manifest/1"] = "nanoseg-registry-manifest/1"
ARTIFACTS = ("model.pt", "model.onnx", "model.plan")
VERSION_RE = re.compile(r"^v(\d{4,})$")


class RegistryError(ConfigError):
    """The registry refuses an operation (corrupt artifact, unknown version, nothing to roll back).

    A ``ConfigError`` (so a ``ValueError``): the ``nanoseg`` command reports it in one line, exit 2.
    """


class Artifact(StrictModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Evaluation(StrictModel):
    """One evaluation of a version on a validation set; ``dataset_sha256`` + ``limit`` say which."""

    dataset: str
    dataset_sha256: str
    limit: int | None
    engine: str
    mask_ap: float | None
    box_ap: float | None
    foreground_accuracy: float
    images: int
    seconds: float
    evaluated_at: str

    def same_set(self, other: Evaluation) -> bool:
        return (self.dataset_sha256, self.limit) == (other.dataset_sha256, other.limit)


class Manifest(StrictModel):
    format: Literal["nanoseg-registry-manifest/1"] = MANIFEST_FORMAT
    version: str
    created: str = Field(description="UTC, ISO 8601")
    source: str = Field(description="the registered checkpoint's path")
    artifacts: dict[str, Artifact]
    architecture: dict[str, Any]
    net_config: dict[str, Any] = Field(alias="model_config", description="the checkpoint's ModelConfig")
    input_spec: dict[str, Any]
    onnx_io: dict[str, Any] = Field(description="name -> {dtype, shape} of the ONNX inputs and outputs")
    training: dict[str, Any] = Field(description="name, iterations, seed, data seed, train config")
    evaluations: list[Evaluation] = Field(default_factory=list)

    def evaluation_on(self, key: Evaluation) -> Evaluation | None:
        """The latest evaluation on the same validation set as ``key``."""
        same = [e for e in self.evaluations if e.same_set(key)]
        return same[-1] if same else None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def default_registry() -> Path:
    """``$NANOSEG_REGISTRY`` or ``<cache>/registry``."""
    return Path(os.environ.get("NANOSEG_REGISTRY") or cache_dir() / "registry")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def onnx_io(onnx_bytes: bytes) -> dict[str, Any]:
    """{"inputs": {name: {dtype, shape}}, "outputs": {...}} of an ONNX model (static shapes);
    RegistryError where the bytes are not an ONNX model."""
    import onnx

    try:
        proto = onnx.load_from_string(onnx_bytes)
    except Exception as err:  # protobuf's DecodeError and kin: the bytes are not a ModelProto
        raise RegistryError(f"not a readable ONNX model ({type(err).__name__}: {err})") from None

    def describe(values: Any) -> dict[str, Any]:
        return {v.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                         "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]}
                for v in values}

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def training_record(meta: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint says about its training: config, seeds (model and data), iterations."""
    tc = meta.get("train_config") or {}
    generate = (tc.get("data") or {}).get("generate") or {}
    return {"name": meta.get("name"), "iterations": meta.get("iterations"), "seed": meta.get("seed", tc.get("seed")),
            "data_seed": generate.get("seed"), "train_seconds": meta.get("train_seconds"), "train_config": tc}


def _manifest_format(path: Path) -> str | None:
    """The ``format`` string of a manifest file; None where it cannot tell (unreadable, not a JSON
    object, no string ``format``): ``Manifest`` validation then says what is wrong."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else None


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # -- reading -----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        d = self.root / "versions"
        return sorted((p.name for p in d.iterdir() if VERSION_RE.match(p.name)), key=lambda v: int(v[1:])) \
            if d.is_dir() else []

    def path(self, version: str) -> Path:
        version = self.resolve(version)
        return self.root / "versions" / version

    def resolve(self, version: str) -> str:
        """``current``, ``v3`` or ``v0003`` -> ``v0003``; unknown versions are errors."""
        if version == "current":
            cur = self.current()
            if cur is None:
                raise RegistryError(f"{self.root}: no current version (promote one first)")
            if cur not in self.versions():
                raise RegistryError(self.dangling(cur))
            return cur
        m = re.match(r"^v?(\d+)$", version)
        name = f"v{int(m.group(1)):04d}" if m else version
        if name not in self.versions():
            raise RegistryError(f"{self.root}: no version {version!r} (have: {', '.join(self.versions()) or 'none'})")
        return name

    def dangling(self, version: str) -> str:
        """What to say of ``current`` pointing to ``version``, which is not in the registry."""
        return (f"{self.root / 'current'} points to {version}, which is not in the registry; "
                "promote a version (--force) to repair it")

    def manifest(self, version: str) -> Manifest:
        """The manifest of ``version``; RegistryError naming the file when it is missing, not JSON,
        malformed, or of another ``format`` (a registry written by a newer nanoseg)."""
        p = self.path(version) / "manifest.json"
        fmt = _manifest_format(p)
        if fmt is not None and fmt != MANIFEST_FORMAT:
            raise RegistryError(f"{p}: manifest format {fmt!r}, this nanoseg reads {MANIFEST_FORMAT!r} "
                                "(written by a newer nanoseg?); refusing to use it")
        try:
            return Manifest.model_validate_json(p.read_bytes())
        except ValidationError as err:  # truncated JSON, a field missing or malformed
            detail = "; ".join(line.partition(": ")[2] for line in format_validation_error(err, "-").splitlines())
            raise RegistryError(f"{p}: unreadable manifest ({detail})") from None
        except (OSError, ValueError) as err:
            raise RegistryError(f"{p}: unreadable manifest ({err})") from None

    def current(self) -> str | None:
        """The version ``current`` points to (None: no ``current`` yet); the version may be missing
        (``resolve("current")`` refuses that).

        Raises
        ------
        RegistryError
            If ``current`` exists but is not a symlink (a hand-made file or directory), which
            ``point_current`` could not replace.
        """
        link = self.root / "current"
        if not link.is_symlink():
            if link.exists():
                raise RegistryError(f"{link}: not a symlink (a file or directory put there by hand?); "
                                    "move it away, then promote a version")
            return None
        return Path(os.readlink(link)).name

    def history(self) -> list[dict[str, Any]]:
        """The entries of ``history.jsonl``, oldest first (none when there is no file).

        Raises
        ------
        RegistryError
            If the file cannot be read, or a line is not a JSON object with a string ``action``
            and ``version`` (a torn last line from a crash mid-append, a hand edit); the message
            names the file and the line.
        """
        p = self.root / "history.jsonl"
        if not p.exists():
            return []
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RegistryError(f"{p}: unreadable history ({err})") from None
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as err:
                raise RegistryError(f"{p}: line {number} is not valid JSON ({err}); a torn write? "
                                    "repair or remove that line") from None
            if not isinstance(entry, dict):
                raise RegistryError(f"{p}: line {number} is not a JSON object")
            for key in ("action", "version"):
                if not isinstance(entry.get(key), str):
                    raise RegistryError(f"{p}: line {number}: field {key!r} is missing or not a string")
            entries.append(entry)
        return entries

    def promotion_stack(self) -> list[str]:
        """Versions that were current, oldest first: a promotion pushes, a rollback pops.

        Raises
        ------
        RegistryError
            If ``history.jsonl`` is malformed (``history``).
        """
        stack: list[str] = []
        for entry in self.history():
            if entry["action"] == "promote":
                stack.append(entry["version"])
            elif entry["action"] == "rollback" and stack:
                stack.pop()
        return stack

    def verify(self, version: str) -> Manifest:
        """Every artifact of the manifest is present, of its size and sha256; else RegistryError."""
        man = self.manifest(version)
        d = self.path(version)
        for name, art in man.artifacts.items():
            p = d / name
            if not p.is_file():
                raise RegistryError(f"{man.version}/{name}: missing; refusing to use {man.version}")
            size = p.stat().st_size
            if size != art.bytes:
                raise RegistryError(f"{man.version}/{name}: {size} bytes, the manifest says {art.bytes} "
                                    f"(truncated or replaced); refusing to use {man.version}")
            digest = file_sha256(p)
            if digest != art.sha256:
                raise RegistryError(f"{man.version}/{name}: sha256 {digest[:16]}... does not match the manifest's "
                                    f"{art.sha256[:16]}... (corrupt or tampered); refusing to use {man.version}")
        return man

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def log(self, action: str, version: str, **info: Any) -> dict[str, Any]:
        entry = {"time": utc_now(), "action": action, "version": version, **info}
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def write_manifest(self, man: Manifest) -> None:
        """Rewrite a manifest (new evaluations); the artifacts themselves never change."""
        write_atomic(self.path(man.version) / "manifest.json",
                     man.model_dump_json(by_alias=True, indent=2).encode() + b"\n")

    def point_current(self, version: str) -> None:
        """Switch ``current`` to ``version`` in one rename: readers see the old or the new target."""
        self.current()  # refuses a ``current`` that is not a symlink, before anything is written
        tmp = self.root / f".current.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(Path("versions") / version, tmp)  # relative, so the registry can be moved
        try:
            os.replace(tmp, self.root / "current")
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def register(self, checkpoint: str | Path, plan: str | Path | None = None) -> Manifest:
        """Copy ``checkpoint`` (and a TensorRT ``plan``) into a new version, export its ONNX, write
        the manifest. The version directory appears complete or not at all (rename of a temp dir);
        a failure part way (disk full, a ``plan`` that cannot be read) removes the temp dir."""
        src = Path(checkpoint)
        ckpt = load_checkpoint(src)  # refuses a file that is not a loadable nanoseg checkpoint
        if plan is not None and not Path(plan).is_file():
            raise RegistryError(f"--plan {plan}: no such file; nothing was registered")
        with self.locked():
            existing = self.versions()
            version = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
            tmp = self.root / "versions" / f".{version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                man = self._fill(tmp, version, src, ckpt, plan)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # no half-written version stays behind
                raise
            os.rename(tmp, self.root / "versions" / version)
            self.log("register", version, source=man.source, sha256=man.artifacts["model.pt"].sha256)
        return man

    def _fill(self, tmp: Path, version: str, src: Path, ckpt: Checkpoint, plan: str | Path | None) -> Manifest:
        """Write ``version``'s artifacts and manifest into the temporary directory ``tmp``."""
        from nanoseg.export import export_checkpoint_onnx
        from nanoseg.model import describe

        shutil.copyfile(src, tmp / "model.pt")
        onnx_bytes = export_checkpoint_onnx(ckpt, version=f"{ckpt.meta.get('name', src.stem)}@{version}")
        write_atomic(tmp / "model.onnx", onnx_bytes)
        if plan is not None:
            shutil.copyfile(plan, tmp / "model.plan")
        artifacts = {n: Artifact(sha256=file_sha256(tmp / n), bytes=(tmp / n).stat().st_size)
                     for n in ARTIFACTS if (tmp / n).exists()}
        man = Manifest(version=version, created=utc_now(), source=str(src.resolve()), artifacts=artifacts,
                       architecture=describe(ckpt.model_config),
                       model_config=ckpt.model_config.model_dump(mode="json"), input_spec=dict(ckpt.input_spec),
                       onnx_io=onnx_io(onnx_bytes), training=training_record(ckpt.meta))
        write_atomic(tmp / "manifest.json", man.model_dump_json(by_alias=True, indent=2).encode() + b"\n")
        for n in artifacts:
            os.chmod(tmp / n, 0o444)
        return man
