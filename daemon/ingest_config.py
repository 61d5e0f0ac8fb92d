"""Configuration of the daemon's inputs: bluesky documents over 0MQ and raw detector frames.

Every field is documented where it is declared; unknown keys are errors (``StrictModel``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from nanoseg.config_io import StrictModel

MiB = 1024 * 1024

#: Canonical metadata name -> start-document key, used unless ``metadata_keys`` renames it.
#: ``pixel_size_nm``, ``i0``, ``dark`` and ``profile`` fill the typed fields of FrameMetadata;
#: every other canonical name is copied into ``FrameMetadata.extra`` under that name.
DEFAULT_METADATA_KEYS: dict[str, str] = {
    "pixel_size_nm": "pixel_size_nm",
    "i0": "i0",
    "dark": "dark",
    "profile": "nanoseg_profile",
    "scan_id": "scan_id",
    "sample": "sample",
}


class FrameSizeLimits(StrictModel):
    """The largest frame an input accepts (reason ``oversize`` beyond); shared by both inputs."""

    max_frame_bytes: int = Field(
        256 * MiB, ge=1, description="Largest frame buffer (prod(shape) * itemsize) accepted."
    )
    max_dim: int = Field(16384, ge=1, description="Largest height or width accepted, pixels.")

    def oversize(self, height: int, width: int, nbytes: int) -> str | None:
        """Why a frame of ``height`` x ``width`` px and ``nbytes`` bytes is refused; None if not."""
        if max(height, width) > self.max_dim:
            return f"shape {height}x{width} exceeds max_dim {self.max_dim}"
        if nbytes > self.max_frame_bytes:
            return f"{nbytes} byte frame exceeds max_frame_bytes {self.max_frame_bytes}"
        return None


class BlueskyIngestConfig(FrameSizeLimits):
    """Bluesky documents from a ``bluesky-0MQ-proxy`` (or any PUB socket speaking its format)."""

    enabled: bool = Field(True, description="Subscribe to bluesky documents at all.")
    address: str = Field(
        "tcp://127.0.0.1:5568",
        description="The proxy's output (PUB) port that the SUB socket connects to.",
    )
    prefix: str = Field(
        "",
        description="Publisher prefix to accept (ASCII, no spaces); '' accepts every prefix.",
    )
    subscribe_all: bool = Field(
        False,
        description="Subscribe to every message and count other prefixes as rejected "
        "(reason bad_prefix) instead of letting 0MQ filter them out before they arrive.",
    )
    serializer: Literal["msgpack", "json", "pickle"] = Field(
        "msgpack",
        description="Payload format: msgpack (NumPy arrays as msgpack_numpy encodes them), json, "
        "or pickle (executes code on load: needs allow_pickle).",
    )
    allow_pickle: bool = Field(
        False, description="Must be true for serializer: pickle. Only for trusted networks."
    )
    image_key: str | None = Field(
        None,
        description="Data key of the image field; None = the first image data key of each "
        "descriptor (shape [H, W], [1, H, W], or a colour image [H, W, 3|4]).",
    )
    color_frames: Literal["gray", "refuse"] = Field(
        "gray",
        description="RGB / RGBA frames: 'gray' converts them to luminance (ITU-R BT.601 "
        "weights, alpha ignored; counted in frames_converted_total), 'refuse' rejects them "
        "(reason color_frame).",
    )
    metadata_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Renames, merged over DEFAULT_METADATA_KEYS: canonical name -> start-document "
        "key ('a.b' reads a nested key). pixel_size_nm, i0, dark and profile are typed; any other "
        "canonical name is copied into the frame metadata's extra.",
    )
    flat_field_key: str = Field(
        "flat_field",
        description="Key of a flat-field (I0 reference) image in the start document, in a "
        "descriptor's configuration data, or in event data (the latest one seen applies).",
    )
    max_open_runs: int = Field(
        8, ge=1, description="Open runs kept at once; a further start evicts the least active."
    )
    max_resources_per_run: int = Field(
        256, ge=1, description="Resource documents remembered per run (oldest forgotten first)."
    )
    max_datums_per_run: int = Field(
        100_000, ge=1, description="Datum documents remembered per run (oldest forgotten first)."
    )
    handlers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra asset handlers: resource spec -> 'module:Class'. AD_HDF5 is built in.",
    )
    stream_readers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra stream-resource readers: mimetype -> 'module:Class' (see "
        "daemon/stream_readers.py). application/x-hdf5 is built in.",
    )
    stream_wait_s: float = Field(
        5.0,
        ge=0,
        description="How long a stream_datum waits for frames its file does not hold yet, "
        "seconds; frames still missing then are counted (reason frames_not_written).",
    )
    early_documents_s: float = Field(
        2.0,
        ge=0,
        description="How long a document that came before what it refers to (an event before its "
        "descriptor, a descriptor before its start, a stream_datum before its stream_resource: "
        "several publishers) is held for it, seconds; replayed in order when it comes, counted "
        "under its reason (unknown_run, unknown_descriptor, unknown_resource) when not. 0: counted at once.",
    )
    early_documents_max: int = Field(
        1000, ge=1, description="Documents held at once (the oldest is counted when one more comes)."
    )
    early_documents_max_bytes: int = Field(
        256 * MiB, ge=0, description="Bytes of inline images in held events, at most (oldest counted first)."
    )
    fill_retry_intervals: list[float] = Field(
        default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2],
        description="Seconds between retries when a referenced file is not readable yet.",
    )
    max_message_bytes: int = Field(
        512 * MiB,
        ge=1024,
        description="Largest message accepted by the socket (ZMQ_MAXMSGSIZE); a larger one "
        "makes 0MQ drop the connection, which then reconnects.",
    )
    rcvhwm: int = Field(10_000, ge=1, description="Receive high-water mark, in messages.")

    @field_validator("prefix")
    @classmethod
    def _prefix_ascii_no_space(cls, v: str) -> str:
        if not v.isascii() or " " in v:
            raise ValueError("must be ASCII without spaces (bluesky's Publisher forbids b' ')")
        return v

    @field_validator("metadata_keys")
    @classmethod
    def _metadata_keys_nonempty(cls, v: dict[str, str]) -> dict[str, str]:
        for name, key in v.items():
            if not name or not key:
                raise ValueError("canonical names and start-document keys must be non-empty")
        return v

    @field_validator("handlers", "stream_readers")
    @classmethod
    def _handler_paths(cls, v: dict[str, str]) -> dict[str, str]:
        for spec, path in v.items():
            if path.count(":") != 1:
                raise ValueError(f"handler for {spec!r} must be 'module:Class', got {path!r}")
        return v

    @model_validator(mode="after")
    def _pickle_needs_consent(self) -> BlueskyIngestConfig:
        if self.serializer == "pickle" and not self.allow_pickle:
            raise ValueError("serializer: pickle needs allow_pickle: true (unpickling runs code)")
        return self

    def resolved_metadata_keys(self) -> dict[str, str]:
        """The defaults with this config's renames applied."""
        return {**DEFAULT_METADATA_KEYS, **self.metadata_keys}


class RawIngestConfig(FrameSizeLimits):
    """Raw detector frames: multipart ``[header JSON, buffer]`` messages (see raw_ingest.py).

    The socket is a PULL socket bound here; detectors connect PUSH sockets. PULL fans in any
    number of senders and never drops in transport: when the daemon falls behind, a sender's
    queue fills to its high-water mark and its send blocks (or fails with EAGAIN if it sends
    non-blocking), so the detector decides; the daemon's own queue policy does the dropping.
    """

    enabled: bool = Field(False, description="Bind the raw frame input at all.")
    bind: str = Field(
        "tcp://127.0.0.1:5570", description="Address the PULL socket binds (port '*' = any free)."
    )
    source: str = Field(
        "detector",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of this input in identifiers: run 'raw:<source>:<run>', "
        "frame 'raw:<source>:<run>:<frame_id>' ('%' and ':' in each part percent-encoded).",
    )
    reject_all_nan: bool = Field(
        True, description="Reject a float frame with no number at all (reason nan_frame)."
    )
    max_open_runs: int = Field(
        64, ge=1, description="Open raw runs kept at once; a new one evicts the least active."
    )
    rcvhwm: int = Field(100, ge=1, description="Receive high-water mark, in messages.")


class CurveConfig(StrictModel):
    """CurveZMQ encryption and authentication (key files as written by zmq.auth)."""

    server_secret_key: Path | None = Field(
        None,
        description="Certificate file with this daemon's secret key, for the sockets it binds "
        "(the raw frame input; required when it is enabled).",
    )
    authorized_clients_dir: Path | None = Field(
        None,
        description="Directory of the public keys of clients allowed to connect; None = any "
        "client that knows the daemon's public key.",
    )
    client_secret_key: Path | None = Field(
        None,
        description="Certificate file with the secret key the daemon uses when it connects to "
        "a CURVE proxy (bluesky input); needs proxy_public_key.",
    )
    proxy_public_key: Path | None = Field(
        None, description="Public key file of the bluesky proxy's output socket."
    )

    @model_validator(mode="after")
    def _client_pair(self) -> CurveConfig:
        if (self.client_secret_key is None) != (self.proxy_public_key is None):
            raise ValueError("client_secret_key and proxy_public_key go together")
        return self


class IngestConfig(StrictModel):
    """All inputs of the daemon."""

    bluesky: BlueskyIngestConfig = Field(default_factory=BlueskyIngestConfig)
    raw: RawIngestConfig = Field(default_factory=RawIngestConfig)
    curve: CurveConfig | None = Field(
        None, description="CurveZMQ keys; None = plain TCP (trusted network only)."
    )
    poll_interval_s: float = Field(
        0.05, gt=0, le=5, description="How often the ingest thread checks for stop, seconds."
    )
    stop_timeout_s: float = Field(
        5.0, gt=0, description="How long stop() waits for the ingest thread, seconds."
    )

    @model_validator(mode="after")
    def _curve_covers_enabled_inputs(self) -> IngestConfig:
        if self.curve is not None and self.raw.enabled and self.curve.server_secret_key is None:
            raise ValueError("curve.server_secret_key is needed to secure the raw input")
        return self
