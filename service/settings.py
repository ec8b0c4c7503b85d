"""Settings: the only reader of the environment (prefix `QAAS_`)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.placement import ANY, NAME, NAME_LENGTH


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAAS_", extra="ignore")

    data_dir: Path = Field(Path("./var"), description="All embedded-mode state lives here.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    database_url: str | None = Field(None, description="Default: SQLite at <data_dir>/qaas.db.")
    broker_url: str | None = Field(None, description="Default: kombu filesystem transport under <data_dir>.")
    broker_key_prefix: str = Field("", description="Redis key prefix, so deployments can share one Redis.")
    storage_dir: Path | None = Field(
        None, description="Local storage (unless QAAS_STORAGE_URL is set). Default: <data_dir>/storage."
    )
    work_dir: Path | None = Field(None, description="Scratch space of a worker's jobs. Default: <data_dir>/work.")
    storage_url: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
        description="`s3://bucket/prefix`: models, datasets and artifacts in S3-compatible object storage "
        "(credentials from the standard AWS variables). Default: the local folder QAAS_STORAGE_DIR.",
    )
    s3_endpoint_url: str | None = Field(None, description="The S3 API's URL for MinIO, Ceph, R2...; unset: AWS.")
    s3_presigned_downloads: bool = Field(
        False, description="Artifact downloads answer 307 to a short-lived presigned URL (after the tenant check)."
    )
    s3_presign_expires_s: int = Field(300, ge=10, le=7 * 24 * 3600)
    s3_part_bytes: int = Field(8 << 20, ge=5 << 20, description="Part size of multipart uploads to S3.")
    direct_upload_part_bytes: int = Field(
        64 << 20,
        ge=5 << 20,
        le=5 << 30,
        description="Part size of the presigned multipart uploads `POST /v1/uploads` hands out (S3 storage).",
    )
    direct_upload_expires_s: int = Field(
        24 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="An upload of `POST /v1/uploads` must be completed within this long; its part URLs expire "
        "then, and the workers' sweep aborts it and removes its parts.",
    )
    worker_cache_bytes: int = Field(
        20 << 30, ge=0, description="A worker's local cache of downloaded inputs, keyed by sha256."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per line, with request id, tenant, job id and attempt."
    )
    metrics_token: SecretStr | None = Field(
        None, description="Operator token for GET /metrics (`Authorization: Bearer <token>`); needed when auth is on."
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Models, datasets and ended jobs older than this many days are removed; off if unset.",
    )
    orphan_grace_s: float = Field(
        24 * 3600,
        ge=3600,
        description="At its start the API removes stored objects that no row points at (an API or a worker died "
        "between storing and recording them) once they are older than this. It must exceed the longest upload "
        "request: on S3 an object sent in parts counts from the start of its upload.",
    )

    auth: Literal["on", "off"] = Field(
        "off",
        description="`on`: every endpoint but health, readiness and docs needs `Authorization: Bearer <key>`.",
    )
    quota_active_jobs: int = Field(20, ge=1, description="Queued + running jobs per tenant.")
    quota_storage_bytes: int = Field(
        100 << 30, ge=1024, description="Stored models, datasets and artifacts per tenant."
    )
    rate_limit_per_minute: int = Field(
        1200, ge=1, description="Requests per API key per minute, across every API process when the broker is Redis."
    )
    auth_failures_per_minute: int = Field(
        600,
        ge=1,
        description="Requests without a valid API key (none, unknown or revoked) from one client address per "
        "minute, across every API process when the broker is Redis; then 429 without a database lookup, for any "
        "key from that address.",
    )
    uploads_in_flight_per_key: int = Field(
        2, ge=1, description="Uploads one API key may have in progress at once, across every API process."
    )
    uploads_in_flight: int = Field(8, ge=1, description="Uploads in progress at once in one API process.")
    slot_lease_s: float = Field(
        30.0,
        ge=1,
        le=600,
        description="With Redis, an upload or event stream holds its key's slot under a lease its API process "
        "renews while it lasts: the slots of a process that died free themselves within this long.",
    )
    allow_insecure: bool = Field(
        False, description="Let the API listen on a non-loopback address with auth off (never in production)."
    )

    events_poll_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="How often an API process reads the jobs that have open event streams.",
    )
    events_progress_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="At most one progress event per job this often while only its progress moves; "
        "a new status, stage or auto candidate goes out at the next poll.",
    )
    events_heartbeat_s: float = Field(
        15.0, gt=0, description="A comment line on every open event stream this often, so proxies keep it open."
    )
    events_max_per_key: int = Field(
        10,
        ge=1,
        description="Event streams one API key may have open at once, across every API process (then 429); with "
        "auth off only QAAS_EVENTS_MAX_PER_PROCESS applies.",
    )
    events_max_per_process: int = Field(1000, ge=1, description="Event streams open at once in one API process.")
    events_max_stream_s: float = Field(
        3600.0,
        gt=0,
        description="An event stream ends cleanly after this long; clients reconnect with Last-Event-ID.",
    )
    events_key_check_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How often an API process checks the keys of its open event streams; a revoked key's streams end.",
    )

    worker_concurrency: int = Field(1, ge=1, le=64)
    worker_pool: str | None = Field(
        None,
        description="The pool this worker is in (a name of the operator's: `edge`, `customer-a`); jobs may target it.",
    )
    worker_class: str | None = Field(
        None,
        description="The worker's class as advertised, instead of the one derived from its CPU "
        "(architecture and best int8 instructions, e.g. `x86_64-avx512vnni`).",
    )
    worker_features: str | None = Field(
        None,
        description="Comma-separated CPU flags (`avx2,avx512_vnni`) the worker advertises instead of the detected "
        "ones; its class is derived from them unless QAAS_WORKER_CLASS is set.",
    )
    worker_heartbeat_s: float = Field(
        15.0, ge=0.2, le=300, description="How often a worker records that it is alive, and how many jobs it runs."
    )
    worker_live_s: float = Field(
        90.0,
        ge=1,
        description="A worker whose last heartbeat is older than this is not live: a job cannot target its class "
        "or pool unless another worker of it is.",
    )
    task_soft_time_limit_s: int = Field(3600, ge=10)
    task_time_limit_s: int = Field(3900, ge=20)
    job_memory_bytes: int = Field(16 << 30, ge=64 << 20, description="Address-space limit of a job process.")
    job_timeout_s: int = Field(3600, ge=5, description="Wall-clock limit of one job attempt.")
    job_file_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="Largest file a job process may write (RLIMIT_FSIZE). Default: twice "
        "the larger upload limit plus 1 GiB (a job writes models about the size of the one it read).",
    )
    job_open_files: int = Field(1024, ge=64, description="Open files of a job process (RLIMIT_NOFILE).")
    job_uid_range: str = Field(
        "200000-299999",
        pattern=r"^(off|[0-9]{1,10}-[0-9]{1,10})$",
        description="FIRST-LAST: a worker running as root runs each job under the lowest free uid of this range "
        "(its gid the same number, no other groups; ids of the host's users and groups are passed over), which "
        "owns the job's folder and nothing else. `off`: jobs run as the worker's own user.",
    )
    job_max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Attempts of a job before it fails with worker_lost (its worker vanished) or "
        "storage_unavailable (object storage stayed unreachable).",
    )
    storage_retry_s: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="A job whose worker could not reach object storage runs again after this long, twice as "
        "long after each further such attempt.",
    )
    job_lease_s: float = Field(120.0, ge=2, description="A running job's lease; renewed while it makes progress.")
    sweep_interval_s: float = Field(30.0, ge=0.5, description="How often a worker looks for lost jobs.")
    queued_resend_s: float = Field(
        600.0,
        ge=1,
        description="A queued job whose message was neither sent nor received by a worker for this long, and that "
        "the broker no longer holds, gets its message sent again.",
    )
    worker_shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM a worker lets its job finish this long, then hands it back."
    )
    evaluation_max_seconds: float = Field(300.0, gt=0, description="Bound on one job's evaluation stage.")
    evaluation_max_samples: int = Field(256, ge=1)
    max_latency_runs: int = Field(1000, ge=1)

    max_model_bytes: int = Field(4 << 30, ge=1024)
    max_dataset_bytes: int = Field(4 << 30, ge=1024)

    @field_validator("job_uid_range")
    @classmethod
    def _uid_range(cls, value: str) -> str:
        if value != "off":
            first, last = (int(x) for x in value.split("-"))
            if not 1000 <= first <= last < 2**32 - 1:
                raise ValueError("QAAS_JOB_UID_RANGE must be FIRST-LAST with 1000 <= FIRST <= LAST < 4294967295")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.task_time_limit_s <= self.task_soft_time_limit_s:
            raise ValueError("QAAS_TASK_TIME_LIMIT_S must be larger than QAAS_TASK_SOFT_TIME_LIMIT_S")
        for name, value in (("QAAS_WORKER_POOL", self.worker_pool), ("QAAS_WORKER_CLASS", self.worker_class)):
            if value is not None and (value == ANY or not NAME.fullmatch(value)):
                raise ValueError(
                    f"{name} must be lower-case letters, digits, '_' and '-' (at most {NAME_LENGTH}), not 'any'"
                )
        if self.worker_live_s <= self.worker_heartbeat_s:
            raise ValueError("QAAS_WORKER_LIVE_S must be larger than QAAS_WORKER_HEARTBEAT_S")
        if self.metrics_token is not None and not self.metrics_token.get_secret_value():
            self.metrics_token = None  # an empty token (compose's default) is no token
        elif self.metrics_token is not None and len(self.metrics_token.get_secret_value()) < 16:
            raise ValueError("QAAS_METRICS_TOKEN must be at least 16 characters (or unset)")
        return self

    @property
    def insecure_listen_problem(self) -> str | None:
        """Why the API must not start with these settings, or None."""
        if self.auth == "on" or self.allow_insecure or is_loopback(self.host):
            return None
        return (
            f"QAAS_AUTH is off and QAAS_HOST={self.host} is not a loopback address: anybody who can reach it "
            "could use the API without a key. Set QAAS_AUTH=on (and create keys with `python -m service.admin "
            "create-key`), listen on 127.0.0.1, or set QAAS_ALLOW_INSECURE=1 if this is really intended."
        )

    def untrusted_proxy_problem(self, forwarded_allow_ips: str | None) -> str | None:
        """Why the per-address limits may hold every client back (uvicorn's FORWARDED_ALLOW_IPS given), or None."""
        if self.auth == "off" or is_loopback(self.host) or forwarded_allow_ips:
            return None
        return (
            f"QAAS_AUTH is on and the API listens on {self.host} without a trusted proxy (FORWARDED_ALLOW_IPS is "
            "unset): behind a load balancer or reverse proxy every request comes from the proxy's address, so "
            "requests without a valid key from anybody (QAAS_AUTH_FAILURES_PER_MINUTE) hold back every client whose "
            "key this process has not seen yet. Set FORWARDED_ALLOW_IPS to the proxy's address so that uvicorn "
            "takes the client's address from X-Forwarded-For, or ignore this if clients connect directly."
        )

    @property
    def resolved_job_file_bytes(self) -> int:
        return self.job_file_bytes or 2 * max(self.max_model_bytes, self.max_dataset_bytes) + (1 << 30)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.resolved_data_dir / "storage").expanduser().resolve()

    @property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.resolved_data_dir / "work").expanduser().resolve()

    @property
    def cache_dir(self) -> Path:
        """A worker's downloaded inputs (beside the work dir, so a job's copy is a hard link)."""
        return self.resolved_data_dir / "cache"

    @property
    def preflight_cache_dir(self) -> Path:
        """Mode auto's pre-flight timings per CPU and ONNX Runtime version, kept across a worker's jobs (a dot
        folder: the input cache's eviction passes over it)."""
        return self.cache_dir / ".preflight"

    @property
    def job_uids(self) -> range | None:
        """QAAS_JOB_UID_RANGE as uids; None when it is off."""
        if self.job_uid_range == "off":
            return None
        first, last = (int(x) for x in self.job_uid_range.split("-"))
        return range(first, last + 1)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'qaas.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.resolved_data_dir / "broker"

    @property
    def is_embedded(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def redis_broker_url(self) -> str | None:
        """The broker's URL when it is Redis (the API processes keep their shared limits there too), else None."""
        url = self.resolved_broker_url
        return url if url.startswith(("redis://", "rediss://")) else None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
