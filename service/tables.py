"""Database rows: uploaded models, datasets, jobs and their artifacts. Blobs live in storage."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.lifecycle import JobStatus
from service.database import Base, UTCDateTime, utcnow

NAME_LENGTH = 255  # of every String(255) column a client's text can reach


def new_id() -> str:
    return str(uuid.uuid4())


def clip(text: str, length: int = NAME_LENGTH) -> str:
    """A client's (or a model's) text cut to fit its column, so the insert cannot fail on it. NUL, which
    PostgreSQL's text refuses, becomes U+FFFD, as undecodable bytes of an upload's form do."""
    return text.replace("\x00", "\ufffd")[:length]


DEFAULT_TENANT = "default"


class ApiKey(Base):
    """An API key: only its sha256 is kept; `prefix` is the visible part that identifies it."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OnnxModel(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, index=True)
    name: Mapped[str] = mapped_column(String(255))
    storage_prefix: Mapped[str] = mapped_column(String(255))
    file_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    ir_version: Mapped[int] = mapped_column(Integer)
    opset: Mapped[int] = mapped_column(Integer)
    producer: Mapped[str] = mapped_column(String(255))
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    op_counts: Mapped[dict[str, int]] = mapped_column(JSON)
    # Names of every node, subgraphs included (None: uploaded before they were recorded).
    node_names: Mapped[list[str] | None] = mapped_column(JSON)
    quantization: Mapped[str | None] = mapped_column(String(32))
    external_data: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_models_created", "created_at", "id"),)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, index=True)
    name: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    num_samples: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    tensors: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON)
    has_labels: Mapped[bool] = mapped_column(Boolean)
    preprocess: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def storage_prefix(self) -> str:
        """The folder of the dataset's stored file (what deleting the dataset removes)."""
        return self.storage_key.rsplit("/", 1)[0]

    __table_args__ = (Index("ix_datasets_created", "created_at", "id"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    calibration_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    evaluation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    evaluation: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    stage: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # What the running job does now, both written from the engine's one note (core/progress.py):
    # its text, and the same typed, {"candidate": {"index", "total", "name"}} while mode auto tries one.
    progress_note: Mapped[str | None] = mapped_column(String(200))
    progress_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))  # X-Request-ID of the request that created it
    # Where it runs: `target` as the request gave it (null: any worker), and the broker queue of each name
    # in it (the first is where the job runs; the others measure it). `measurements_pending` while a
    # succeeded job's result still waits for one of those (service/jobs/measurements.py).
    target: Mapped[str | list[str] | None] = mapped_column(JSON)
    queues: Mapped[list[str] | None] = mapped_column(JSON)
    measurements_pending: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When its run message was last sent (the first one right after the row is committed), and when a worker
    # last received one, even one it holds until a countdown: the sweep re-sends only a queued job with
    # neither for QAAS_QUEUED_RESEND_S whose message the broker no longer holds (worker/reaper.py).
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)
    received_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    artifacts: Mapped[list[Artifact]] = relationship(back_populates="job", order_by="Artifact.name")

    __table_args__ = (
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_idempotency_key", "idempotency_key"),
    )


class Worker(Base):
    """A worker process as it advertises itself, refreshed by its heartbeat (worker/presence.py): its class,
    pool and CPU, and how many tasks it runs. A row whose `last_seen_at` is recent enough is a live worker."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # new at every start of the process
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    worker_class: Mapped[str] = mapped_column(String(64), index=True)
    pool: Mapped[str | None] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(32))
    features: Mapped[list[str]] = mapped_column(JSON)
    cores: Mapped[int] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    running: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")

    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),)


class Upload(Base):
    """External data a client sends straight to the object store (`POST /v1/uploads`): the files it
    declared, each with its multipart upload, under the keys of the model it becomes when completed
    (`model_id`, chosen here). `status`: open, then completed (the model exists) or aborted (by
    `DELETE`, or by the sweep once `expires_at` passed)."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, index=True)
    model_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16), default="open")
    # [{"name", "size_bytes", "sha256" (null: not declared), "key", "upload_id", "part_bytes"}]
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # of all its files, as declared
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def storage_prefix(self) -> str:
        """The folder its files go to, the model's (what aborting it removes)."""
        return str(self.files[0]["key"]).rsplit("/", 1)[0]

    __table_args__ = (Index("ix_uploads_status_expires", "status", "expires_at"),)


__all__ = [
    "DEFAULT_TENANT",
    "ApiKey",
    "Artifact",
    "Dataset",
    "Job",
    "OnnxModel",
    "Upload",
    "Worker",
]
