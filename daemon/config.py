"""The daemon's configuration: one YAML file (``configs/daemon/*.yaml``) validated by pydantic.

Every field is documented where declared; unknown keys are errors naming the field. Environment
variables override single values: ``NANOSEG__MODEL__ENGINE=torch`` sets ``model.engine``
(double underscore between levels; the value is parsed as a YAML scalar).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import EnvSettingsSource, SettingsError

from nanoseg.config_io import (
    ConfigError,
    StrictModel,
    apply_overrides,
    merge,
    parse_config,
    read_yaml_mapping,
)
from nanoseg.engines.null_engine import DETECTIONS
from nanoseg.postprocess import PostprocessConfig
from nanoseg.summary_stats import StatisticsConfig
from nanoseg_daemon.growth import GrowthConfig
from nanoseg_daemon.ingest_config import CurveConfig, IngestConfig
from nanoseg_daemon.queueing import Policy

if TYPE_CHECKING:  # the engines import torchvision (seconds): a config is checked without them
    from nanoseg.engines.triton_engine import TritonTarget

ENV_PREFIX = "NANOSEG__"


class ModelSection(StrictModel):
    path: str = Field("models/default/model.pt", description="nanoseg checkpoint; relative paths from the repository root.")
    engine: Literal["torch", "onnxruntime", "tensorrt", "triton", "null"] = Field(
        "onnxruntime", description="Inference engine; null: fixed detections, no network (benchmarks of the daemon itself).")
    device: str = Field("cpu", description="cpu, cuda or cuda:N (not used by engine triton).")
    threads: int = Field(2, ge=1, description="CPU threads for inference, per instance.")
    instances: int = Field(1, ge=1, le=16, description="Copies of the network that run batches at once, each "
                           "on its own engine (with `threads` threads each; memory: one model per copy). On 2 "
                           "cores, 2 instances of 1 thread read 18 % more frames/s than 1 of 2 threads when "
                           "saturated, each frame taking 1.7x longer alone (BENCHMARKS.md); on a GPU, "
                           "concurrent streams.")
    onnx_path: str | None = Field(None, description="Exported ONNX to use; None = export from the checkpoint at start.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Refuse a checkpoint with another digest.")
    engine_cache_dir: str | None = Field(None, description="TensorRT plan cache; None = <state_dir>/engines.")
    triton_url: str | None = Field(None, description="engine triton: the server's gRPC address HOST:PORT.")
    triton_model: str | None = Field(None, description="engine triton: the model name in the server's repository.")
    mask_tta: Literal[1, 2, 4, 8] | None = Field(
        None, description="Average masks over this many flipped/transposed views (None = the model's own; "
                          "costs about N x the backbone; not with engine triton).")
    max_detections: int | None = Field(
        None, ge=1, le=1000, description="Detections kept per model input (and RPN proposals, at least as many); "
                                         "None = the model's own. Raise it for fields of hundreds of small "
                                         "particles. Not with an exported onnx_path or engine triton, whose "
                                         "graphs fix it.")

    null_detections: int = Field(
        len(DETECTIONS), ge=0, le=len(DETECTIONS), description="engine null: rods per model input, the first N of its six (0: none, every "
                                   "stage still runs; measures the path without per-particle work).")

    @field_validator("engine", mode="before")
    @classmethod
    def _yaml_null_is_the_null_engine(cls, value: Any) -> Any:
        return "null" if value is None else value  # `engine: null` in YAML, --set or the environment

    @model_validator(mode="after")
    def _max_detections_where_the_graph_is_built(self) -> ModelSection:
        if self.max_detections is not None and (self.onnx_path or self.engine == "triton"):
            raise ValueError("max_detections needs a graph built from the checkpoint (no onnx_path, not triton)")
        return self

    @model_validator(mode="after")
    def _null_detections_with_the_null_engine(self) -> ModelSection:
        if "null_detections" in self.model_fields_set and self.engine != "null":
            raise ValueError("null_detections is for engine null only")
        return self

    @model_validator(mode="after")
    def _triton_needs_a_target(self) -> ModelSection:
        if self.engine == "triton" and not (self.triton_url and self.triton_model):
            raise ValueError("engine triton needs model.triton_url (HOST:PORT) and model.triton_model")
        return self

    def triton_target(self) -> TritonTarget | None:
        """The server and model of engine triton; None for the local engines."""
        if self.engine != "triton" or not self.triton_url or not self.triton_model:
            return None
        from nanoseg.engines.triton_engine import TritonTarget

        return TritonTarget(self.triton_url, self.triton_model)


class QueueSection(StrictModel):
    size: int = Field(16, ge=1, description="Frames waiting for analysis at most.")
    policy: Policy = Field("block", description="block, drop_oldest or latest_only (live view).")
    block_timeout_s: float = Field(5.0, gt=0, description="block: how long ingest waits for space before dropping.")


class BatchingSection(StrictModel):
    max_batch: int = Field(8, ge=1, le=256, description="Frames analysed together at most: the frames waiting after "
                           "preparation go to the engine in one call (in calls of the engine's own max_batch model inputs).")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long the first frame of a batch waits for more "
                               "to arrive, ms (0: take only what is already waiting).")
    pack_small_frames: bool = Field(False, description="Frames of a batch small enough (at most half the model "
                                    "input, with the gap) share model inputs, several to one (nanoseg.mosaic): the "
                                    "network runs once per mosaic instead of once per frame.")
    pack_gap_px: int = Field(64, ge=0, le=256, description="Padding kept right of and below each packed frame, "
                             "model px (the neighbours' content the network sees: 64 cost 0.8 mask AP on 128 px "
                             "frames, 4 to an input; 32 cost 2.2, 9 to an input; BENCHMARKS.md).")


class BlueskyPublishSection(StrictModel):
    enabled: bool = Field(True, description="Publish analysis runs as bluesky documents.")
    address: str = Field("tcp://127.0.0.1:5567", description="The 0MQ proxy's input port (connect), or an address to bind.")
    bind: bool = Field(False, description="Bind instead of connecting (direct subscribers, no proxy).")
    prefix: str = Field("", description="bluesky Publisher prefix.")
    serializer: Literal["msgpack", "json"] = Field("msgpack", description="Document encoding.")


class SummaryPublishSection(StrictModel):
    enabled: bool = Field(True, description="Plain JSON per-frame summaries on a PUB socket.")
    address: str = Field("tcp://127.0.0.1:5590", description="Address the PUB socket binds.")


class PublishSection(StrictModel):
    bluesky: BlueskyPublishSection = Field(default_factory=BlueskyPublishSection)
    summary: SummaryPublishSection = Field(default_factory=SummaryPublishSection)
    run_stop_timeout_s: float = Field(3600.0, gt=0, description="Close an analysis run whose raw run sent no stop for this long after its last frame.")
    resume_timeout_s: float = Field(600.0, gt=0, description="After a restart, close (exit status abort) a run that was open "
                                    "and sent nothing more for this long: its stop came while the daemon was down.")
    send_hwm: int = Field(1000, ge=1, description="Messages queued per subscriber; beyond, publication drops (publish_dropped_total) rather than block analysis.")
    curve: CurveConfig | None = Field(None, description="CurveZMQ: bound sockets (summary; bluesky with bind) are CURVE servers "
                                      "(server_secret_key, authorized_clients_dir); bluesky connecting to a proxy is its CURVE client "
                                      "(client_secret_key, proxy_public_key).")

    @model_validator(mode="after")
    def _curve_covers_bound_sockets(self) -> PublishSection:
        binds = self.summary.enabled or (self.bluesky.enabled and self.bluesky.bind)
        if self.curve is not None and binds and self.curve.server_secret_key is None:
            raise ValueError("curve.server_secret_key is needed to secure the bound publication sockets")
        return self


class StoreSection(StrictModel):
    state_dir: str = Field("~/.local/state/nanoseg", description="Results database and engine caches live here.")
    synchronous: Literal["NORMAL", "FULL"] = Field("NORMAL", description="SQLite durability: NORMAL survives process crashes, FULL also power loss.")
    max_bytes: int | None = Field(None, ge=1 << 20, description="Cap on the database size; writes beyond fail with reason disk_full.")
    max_pending: int = Field(1000, ge=1, description="Results kept in memory while the store fails; beyond, the oldest is lost (counted).")


class ControlSection(StrictModel):
    address: str = Field("tcp://127.0.0.1:5580", description="REP socket for status/pause/resume/reload_model/set.")
    curve: CurveConfig | None = Field(None, description="CurveZMQ: only authorised clients may control the daemon.")


class MetricsSection(StrictModel):
    enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz over HTTP.")
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(9109, ge=0, le=65535, description="HTTP port (0 = any free port).")


class ShutdownSection(StrictModel):
    drain_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM, finish queued frames within this time.")


class LogSection(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_lines: bool = Field(True, description="One JSON object per line (false: plain text).")


class TiledSection(StrictModel):
    uri: str = Field(description="Tiled server URL, e.g. http://tiled.example:8000 (optionally /api/v1/metadata/<path>).")
    api_key: str | None = Field(None, description="Tiled API key; better from the environment: NANOSEG__TILED__API_KEY.")
    path: list[str] = Field(default_factory=list, description="Container (keys from the root) that receives the "
                            "analysis runs; created where missing. Empty = the root.")
    timeout_s: float = Field(10.0, gt=0, description="Time limit per Tiled call, s (wall clock, tiled's own retries included); a slower "
                                                "server counts as a failed write and stalls the output once per outage at most.")
    retry_after_s: float = Field(30.0, ge=0, description="After the server was unreachable, items are counted failed "
                                 "without trying it for this long (a hung server must not stall the output).")
    raw_path: list[str] = Field(default_factory=list, description="Container (keys from the root) holding the raw "
                                "runs, as the RunEngine's TiledWriter writes them; read to recover a run whose start "
                                "the daemon never saw, and by nanoseg reanalyse. Empty = the root.")
    recover_runs: bool = Field(True, description="A run whose start the daemon never saw (it joined late): fetch its "
                               "start and descriptors from Tiled and analyse its later frames.")
    recover_recent_runs: int = Field(10, ge=1, description="An event names its descriptor, not its run: the newest "
                                     "this many runs under raw_path are searched for an unknown descriptor.")


class DaemonStatistics(StatisticsConfig):
    """The core's summary settings plus where the daemon measures particles."""

    workers: int = Field(0, ge=0, le=256, description="Processes that compute particle statistics (tables and "
                         "summaries) beside the daemon, each frame in one of them (0: in the daemon's measure "
                         "thread, one core at most). For machines with cores to spare, e.g. a GPU server, "
                         "where the statistics would otherwise limit the frames per second. A worker that "
                         "dies is replaced; its frames are measured in the daemon, nothing is lost.")


SinkName = Literal["store", "bluesky", "summary", "tiled"]
"""The daemon's sinks (``daemon/sinks.py``, ``daemon/tiled_sink.py``); their settings are the
sections ``store``, ``publish.bluesky``, ``publish.summary`` and ``tiled``."""


class DaemonConfig(StrictModel):
    """``nanoseg serve --config FILE``."""

    name: str = Field("nanoseg", description="Instance name, in logs and status.")
    model: ModelSection = Field(default_factory=ModelSection)
    profile: str = Field("ptychography", description="Default frame profile (configs/profiles or a path).")
    postprocess: PostprocessConfig = Field(
        default_factory=PostprocessConfig,
        description="Fields set here override the model's own operating point (its checkpoint's thresholds).")
    statistics: DaemonStatistics = Field(
        default_factory=lambda: DaemonStatistics(),
        description="Frame summaries: edge_rule (include, exclude, miles_lantuejoul), bootstrap_resamples, "
                    "target_precision (the rule is stated in every summary); workers: processes that "
                    "measure particles beside the daemon.")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    queue: QueueSection = Field(default_factory=QueueSection)
    batching: BatchingSection = Field(default_factory=BatchingSection)
    publish: PublishSection = Field(default_factory=PublishSection)
    store: StoreSection = Field(default_factory=StoreSection)
    control: ControlSection = Field(default_factory=ControlSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    shutdown: ShutdownSection = Field(default_factory=ShutdownSection)
    log: LogSection = Field(default_factory=LogSection)
    growth: GrowthConfig = Field(default_factory=GrowthConfig, description="Per-run growth series, EWMA, rates and alarm rules.")
    tiled: TiledSection | None = Field(None, description="Write analysis runs (label images, particle tables) "
                                       "into a Tiled catalog (sink tiled); None = no Tiled.")
    sinks: list[SinkName] | None = Field(
        None, description="Where results go, in order: store, bluesky, summary, tiled. None = store, then bluesky and "
                          "summary where publish.<name>.enabled, then tiled where a tiled section is given. The store, when listed, comes first (results are "
                          "stored before they are published); growth alarms travel with bluesky.")

    @field_validator("sinks")
    @classmethod
    def _sinks_once_store_first(cls, names: list[SinkName] | None) -> list[SinkName] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"each sink once, got {names}")
        if names and "store" in names and names[0] != "store":
            raise ValueError("store must come first (results are stored before they are published)")
        return names

    @model_validator(mode="after")
    def _listed_sinks_are_enabled(self) -> DaemonConfig:
        names = self.sinks or []
        off = [n for n in ("bluesky", "summary") if n in names and not getattr(self.publish, n).enabled]
        if off:
            raise ValueError(f"sinks: {', '.join(off)} listed but publish.{off[0]}.enabled is false")
        if "tiled" in names and self.tiled is None:
            raise ValueError("sinks: tiled listed but there is no tiled section (tiled.uri)")
        return self

    @property
    def sink_names(self) -> list[SinkName]:
        """The sinks in effect: ``sinks``, or its default."""
        if self.sinks is not None:
            return list(self.sinks)
        enabled: list[SinkName] = [n for n in ("bluesky", "summary") if getattr(self.publish, n).enabled]
        tiled: list[SinkName] = ["tiled"] if self.tiled is not None else []
        return ["store", *enabled, *tiled]

    @property
    def state_dir(self) -> Path:
        return Path(os.path.expanduser(self.store.state_dir))

    @property
    def engine_cache(self) -> Path:
        """Where built engines (TensorRT plans) are cached: model.engine_cache_dir or <state_dir>/engines."""
        m = self.model
        return Path(m.engine_cache_dir).expanduser() if m.engine_cache_dir else self.state_dir / "engines"


def check_files(cfg: DaemonConfig, source: str) -> None:
    """Raise ConfigError naming every field whose file or directory does not exist.

    Run by ``nanoseg serve`` before anything starts, so a wrong path fails with its field named
    (``model.path: no such file``) instead of deep inside model loading or socket setup.
    """
    from nanoseg.paths import REPO_ROOT, resolve_config

    wanted: list[tuple[str, str | Path | None, bool]] = [  # field, path, is a directory
        ("model.path", cfg.model.path, False), ("model.onnx_path", cfg.model.onnx_path, False)]
    for section, curve in (("control", cfg.control.curve), ("ingest", cfg.ingest.curve), ("publish", cfg.publish.curve)):
        if curve is not None:
            wanted += [(f"{section}.curve.{name}", getattr(curve, name), name.endswith("_dir"))
                       for name in ("server_secret_key", "authorized_clients_dir", "client_secret_key", "proxy_public_key")]
    problems = []
    for name, path, is_dir in wanted:
        if path is None:
            continue
        p = Path(path).expanduser()
        if name.startswith("model.") and not p.is_absolute() and not p.exists():
            p = REPO_ROOT / p  # as the service resolves model paths (model_slot.repo_relative)
        if not (p.is_dir() if is_dir else p.is_file()):
            problems.append(f"{source}: {name}: no such {'directory' if is_dir else 'file'}: {p}")
    try:
        resolve_config(cfg.profile, "profiles").stat()
    except (FileNotFoundError, OSError) as err:
        problems.append(f"{source}: profile: {err}")
    if problems:
        raise ConfigError("\n".join(problems))


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``NANOSEG__A__B=v`` -> ``{"a": {"b": v}}``, ``v`` parsed as a YAML scalar.

    pydantic-settings reads the variables (prefix and nesting as ``DaemonConfig`` declares them);
    a variable that names no field is an error naming it, as an unknown key in the file is.
    """
    ours = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    # DaemonConfig is a plain model, not a BaseSettings: the source only reads its fields, it
    # never validates (parse_config does, once, with the file and --set merged).
    source = EnvSettingsSource(DaemonConfig, case_sensitive=False, env_prefix=ENV_PREFIX,  # type: ignore[arg-type]
                               env_nested_delimiter="__")
    source.env_vars = {k.lower(): v for k, v in ours.items()}
    try:
        found = source()
    except SettingsError as err:  # e.g. NANOSEG__INGEST__RAW=x: a section given one value
        raise ConfigError(f"environment: {err} (a section's keys are set one by one: "
                          f"{ENV_PREFIX}SECTION__KEY=value)") from None
    for name in sorted(ours):
        node: Any = found
        for key in name[len(ENV_PREFIX):].lower().split("__"):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            raise ConfigError(f"environment: {name}: {dotted}: unknown key")
    return _yaml_scalars(found, ())


def _yaml_scalars(node: Any, where: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        return {k: _yaml_scalars(v, (*where, k)) for k, v in node.items()}
    if not isinstance(node, str):
        return node
    try:
        return yaml.safe_load(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"environment: {'.'.join(where)}: value is not valid YAML: {err}") from None


def load_daemon_config(path: str | Path | None, overrides: Mapping[str, str] | None = None,
                       environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """File (optional) < environment < explicit overrides; validated once."""
    source = str(path) if path else "<defaults>"
    data = read_yaml_mapping(path) if path is not None else {}
    data = merge(data, env_overrides(os.environ if environ is None else environ))
    data = apply_overrides(data, overrides or {}, f"{source} (--set)")
    return parse_config(data, DaemonConfig, source)
