"""One Settings object for every process of synthperf.

Values come, in rising priority, from the embedded defaults below, an optional YAML file
(``SYNTHPERF_CONFIG`` or ``--config``), and environment variables prefixed ``SYNTHPERF_``.
The defaults are the embedded ones (SQLite job store, filesystem broker, local spool, demo
weights) so that ``make run`` needs no server; production points them at PostgreSQL and Redis.

Validation happens at start-up: a bad value raises :class:`SettingsError` whose message names
the setting, so an admin reading the log knows what to fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit  # StowDestination

import yaml
from pydantic import (  # StowDestination
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash
#: The Tmax network's execution paths (models.tmax_ddpm.runtime.PATHS; common may not import models,
#: tests/unit/test_runtime.py checks the two lists agree).
INFERENCE_PATHS = ("fp32", "channels_last", "bf16", "compile", "onnxruntime", "openvino")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


def _split_csv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


class Destination(BaseSettings):
    """A DICOM node results are pushed to (a PACS)."""

    model_config = SettingsConfigDict(extra="forbid")

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        if not _AE_TITLE.match(v) or not v.strip():
            raise ValueError(f"destination ae_title {v!r} is not a valid AE title (1-16 printable characters)")
        return v

    @property
    def key(self) -> str:
        """How deliveries, logs and the dashboard name this destination (as StowDestination.key)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class StowDestination(BaseModel):
    """A DICOMweb STOW-RS endpoint results are stored to (PS3.18 10.5), beside C-STORE PACS.

    ``url`` is the DICOMweb base (``.../dicom-web``; we POST to ``{url}/studies``). At most one of
    ``bearer_token`` and ``username``/``password`` (HTTP basic). TLS is verified by default, against
    ``ca_file`` when set; ``verify_tls: false`` is for test servers only. A plain BaseModel, not
    BaseSettings: an unset ``username`` must never be filled in from the environment's USERNAME.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=190)
    bearer_token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    max_objects_per_request: int = Field(default=32, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"STOW-RS url {v!r} must be http(s)://host[:port]/path")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"STOW-RS url {v!r}: no credentials, query or fragment (use username/password)")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check_auth(self) -> StowDestination:
        if self.bearer_token is not None and (self.username or self.password is not None):
            raise ValueError("STOW-RS destination: give bearer_token or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("STOW-RS destination: username and password go together")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"STOW-RS destination: ca_file {self.ca_file} does not exist")
        return self

    @property
    def key(self) -> str:
        """How deliveries, logs and the dashboard name this destination (no credentials)."""
        return f"STOW-RS {self.url}"


class Settings(BaseSettings):
    """All configuration. Field names map to env vars as SYNTHPERF_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="SYNTHPERF_", extra="forbid", env_nested_delimiter="__")

    # --- storage
    data_dir: Path = Field(default=Path("./var"), description="Root of spool, job store, outputs.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite under data_dir.")

    # --- broker
    broker_url: str = Field(default="", description="Celery broker; empty = filesystem broker under data_dir.")
    task_time_limit_s: int = Field(default=1800, ge=10)
    # Liveness (issue 16): a running job holds a lease in the job store that its worker renews; an
    # expired lease is re-queued by the reaper within lease_s + lease_reap_s of the worker's death.
    lease_s: float = Field(default=20.0, gt=0, description="A job's lease lasts this long unless renewed.")
    lease_renew_s: float = Field(default=3.0, gt=0, description="The worker renews its leases this often.")
    lease_reap_s: float = Field(default=5.0, gt=0, description="How often expired leases are looked for.")
    max_stage_attempts: int = Field(
        default=3, ge=1, description="Workers lost in one stage before the job is poisoned (not retried)."
    )
    broker_visibility_timeout_s: int = Field(
        default=900, ge=60,
        description="Redis redelivers an unacknowledged task after this; a backstop only (leases recover sooner).",
    )
    chain_stages: bool = Field(
        default=True,
        description="Stroke first: a worker that consumes the next task's queue runs its stages at once instead "
        "of queueing them behind other studies (off = hand every task off through the broker).",
    )

    # --- DICOM SCP
    ae_title: str = "SYNTHPERF"
    scp_host: str = "0.0.0.0"
    scp_port: int = Field(default=11112, ge=0, le=65535)
    allowed_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_associations: int = Field(default=10, ge=1, description="Established associations at once.")
    # Hostile or broken peers (service/scp/gate.py): connections not yet associated have their own,
    # larger cap and a total handshake deadline; each PDU has a total deadline.
    max_pending_connections: int = Field(
        default=64, ge=1, description="Connections not yet associated; when full, the oldest is closed."
    )
    max_pending_per_ip: int = Field(
        default=16, ge=1, description="Connections not yet associated from one peer IP; when full, its oldest is closed."
    )
    handshake_timeout_s: float = Field(
        default=10.0, gt=0, description="Total time from connect (TLS included) to a complete A-ASSOCIATE-RQ."
    )
    pdu_timeout_s: float = Field(
        default=30.0, gt=0, description="Total time for one PDU from its first byte, plus its size at min_pdu_rate_kib_s."
    )
    min_pdu_rate_kib_s: float = Field(default=64.0, gt=0, description="Slowest PDU arrival rate counted as progress.")
    evict_stalled_s: float = Field(
        default=5.0, gt=0, description="At max_associations, abort an association stalled this long to admit a new one."
    )
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    max_pdu: int = Field(default=0, ge=0, description="0 = unlimited")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = Field(default=None, description="CA to verify peers; set to require client certs.")
    disk_watermark_mb: int = Field(default=1024, ge=0, description="Refuse associations below this free space.")
    scp_engine: str = Field(
        default="fast", description="fast (our lean Upper Layer, default) or pynetdicom (reference engine)."
    )
    spool_fsync: bool = Field(
        default=True, description="fsync each received file before Success (power-loss safe); off = faster."
    )

    # --- gateway replicas (issue 19): several gateways on one PostgreSQL job store, each named
    replica_id: str = Field(
        default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="This gateway's name among several on one job store (the pod name in Kubernetes); empty = "
        "the only gateway. Names its serve.pid lock, so replicas can share one data dir.",
    )
    replica_lease_s: float = Field(
        default=30.0, gt=0, description="A gateway's registry row counts as live this long after its last renewal."
    )

    # --- completion
    stable_age_s: float = Field(default=10.0, gt=0)
    completion_ceiling_s: float = Field(default=600.0, gt=0)
    completion_poll_s: float = Field(default=0.2, gt=0)
    incomplete_series_wait_s: float = Field(
        default=30.0, gt=0,
        description="Quiet time after which a study fires although a series has fewer images than it declared.",
    )

    # --- pipeline / model
    model_name: str = "demo"
    # None = the model's own defaults, chosen by its Dice-versus-steps benchmark (docs/model-card.md).
    ddim_steps: int | None = Field(default=None, ge=1, le=1000)
    samples: int | None = Field(default=None, ge=1, le=64)
    seed: int = 0
    device: str = Field(default="auto", description="auto, cpu or cuda")
    inference_path: str = Field(
        default="auto",
        description="How the Tmax network runs: auto (measured on this machine, cached under data_dir/runtime) "
        f"or one of {', '.join(INFERENCE_PATHS)} to force it.",
    )
    inference_try_compile: bool = Field(
        default=False, description="Let auto also measure torch.compile (minutes of warm-up per worker process)."
    )
    inference_cache_dir: Path | None = Field(
        default=None, description="Where the per-machine inference-path measurements live; empty = data_dir/runtime."
    )
    rules_file: Path | None = None
    adc_core_threshold: float = Field(default=620.0, gt=0, description="ADC in 1e-6 mm2/s")
    core_min_component_ml: float = Field(default=0.1, ge=0)
    tmax_hypoperfusion_s: float = 6.0
    tmax_severe_s: float = 10.0
    defuse3_core_max_ml: float = 70.0
    defuse3_ratio_min: float = 1.8
    defuse3_mismatch_min_ml: float = 15.0
    extend_core_max_ml: float = 70.0
    extend_ratio_min: float = 1.2
    extend_mismatch_min_ml: float = 10.0
    flair_mismatch_ratio_max: float = Field(default=1.15, gt=0, description="FLAIR core/mirror ratio below this = DWI-FLAIR mismatch")
    core_model_weights: Path | None = Field(default=None, description="Learned core model (.safetensors, JSON config beside it); empty = ADC rule")

    # --- push
    destinations: list[Destination | StowDestination] = Field(
        default_factory=list,
        description="Where results go: C-STORE PACS {ae_title, host, port, tls} and/or DICOMweb STOW-RS "
        "{url, bearer_token | username+password, verify_tls, ca_file} (StowDestination).",
    )
    push_retry_period_s: float = Field(default=24 * 3600, gt=0)
    push_backoff_initial_s: float = Field(default=5.0, gt=0)
    push_backoff_max_s: float = Field(default=600.0, gt=0)
    push_calling_aet: str = "SYNTHPERF"

    # --- API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    secret_key: str = Field(default="", description="Session signing key; empty = generated into data_dir.")
    auth_mode: str = Field(default="local", description="local or proxy")
    proxy_user_header: str = "X-Remote-User"
    proxy_role_header: str = "X-Remote-Role"
    cookie_secure: bool = False
    admin_user: str = Field(default="admin", description="First admin created at API start-up when no admin exists.")
    admin_password: SecretStr | None = Field(default=None, description="Password for admin_user; unset = no auto-create.")
    session_max_age_s: int = Field(default=12 * 3600, ge=60, description="Dashboard login lifetime.")
    login_max_failures: int = Field(default=5, ge=1, description="Failed logins per account per window before 429.")
    login_max_failures_per_ip: int = Field(
        default=50, ge=1, description="Failed logins from one client IP (any accounts) per window before 429."
    )
    login_window_s: float = Field(default=300.0, gt=0)
    log_json: bool = False
    log_level: str = "INFO"

    @field_validator("allowed_aets", mode="before")
    @classmethod
    def _csv_aets(cls, v: Any) -> list[str]:
        return _split_csv(v)

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _csv_networks(cls, v: Any) -> list[str]:
        return _split_csv(v)

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR network (e.g. 10.0.0.0/8)") from exc
        return v

    @field_validator("ae_title", "push_calling_aet")
    @classmethod
    def _check_own_ae(cls, v: str) -> str:
        if not _AE_TITLE.match(v) or not v.strip():
            raise ValueError(f"{v!r} is not a valid AE title (1-16 printable characters, no backslash)")
        return v

    @field_validator("allowed_aets")
    @classmethod
    def _check_aets(cls, v: list[str]) -> list[str]:
        for ae in v:
            if not _AE_TITLE.match(ae):
                raise ValueError(f"{ae!r} is not a valid AE title")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in {"auto", "cpu", "cuda"} and not v.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("inference_path")
    @classmethod
    def _check_inference_path(cls, v: str) -> str:
        if v != "auto" and v not in INFERENCE_PATHS:
            raise ValueError(f"must be auto or one of {', '.join(INFERENCE_PATHS)}")
        return v

    @field_validator("scp_engine")
    @classmethod
    def _check_scp_engine(cls, v: str) -> str:
        if v not in {"fast", "pynetdicom"}:
            raise ValueError("must be 'fast' or 'pynetdicom'")
        return v

    @field_validator("auth_mode")
    @classmethod
    def _check_auth_mode(cls, v: str) -> str:
        if v not in {"local", "proxy"}:
            raise ValueError("must be 'local' or 'proxy'")
        return v

    @model_validator(mode="after")
    def _check_pending_limits(self) -> Settings:
        if self.max_pending_per_ip > self.max_pending_connections:
            raise ValueError(
                f"max_pending_per_ip ({self.max_pending_per_ip}) must not exceed "
                f"max_pending_connections ({self.max_pending_connections})"
            )
        return self

    @model_validator(mode="after")
    def _check_login_limits(self) -> Settings:
        if self.login_max_failures_per_ip < self.login_max_failures:
            raise ValueError(
                f"login_max_failures_per_ip ({self.login_max_failures_per_ip}) must be at least "
                f"login_max_failures ({self.login_max_failures}): many accounts share one IP"
            )
        return self

    @model_validator(mode="after")
    def _check_leases(self) -> Settings:
        if self.lease_renew_s * 2 > self.lease_s:
            raise ValueError(f"lease_renew_s ({self.lease_renew_s}) must be at most half of lease_s ({self.lease_s}): "
                             "one late renewal must not lose a healthy worker's lease")
        if self.broker_visibility_timeout_s <= self.push_backoff_max_s:
            raise ValueError(f"broker_visibility_timeout_s ({self.broker_visibility_timeout_s}) must exceed "
                             f"push_backoff_max_s ({self.push_backoff_max_s}): a waiting push would be redelivered")
        return self

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path} does not exist")
        return self

    # --- derived paths: one place decides the layout under data_dir
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def runtime_dir(self) -> Path:
        """Per-machine inference-path measurements (runtime-*.json) and the exported ONNX denoiser."""
        return self.inference_cache_dir or self.data_dir / "runtime"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'synthperf.db').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        env = "SYNTHPERF_" + str(err["loc"][0]).upper() if err["loc"] else ""
        lines.append(f"setting {loc!r} ({env}): {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build and validate Settings: defaults < YAML file < environment < explicit overrides.

    Raises SettingsError naming the bad setting.
    """
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get("SYNTHPERF_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(f"setting 'config': file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"setting 'config': {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"setting 'config': {p} must hold a mapping of setting names to values")
        file_values = loaded
    env_keys = {k[len("SYNTHPERF_"):].lower() for k in os.environ if k.startswith("SYNTHPERF_")}
    # YAML values apply only where the environment does not set the same name.
    init = {k: v for k, v in file_values.items() if k not in env_keys}
    init.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**init)
    except ValidationError as exc:
        raise SettingsError(_format_validation_error(exc)) from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (FastAPI dependency and worker default)."""
    return load_settings()
