"""Per-tenant quotas: stored bytes and active (queued + running) jobs.

Every stored file is charged `FILE_OVERHEAD_BYTES` on top of its size: an inode and a block cost the
operator's disk whatever the file holds, so a zip of empty files is not free. An open upload to the
object store (`POST /v1/uploads`) holds what it declared until it is completed, deleted or expires:
its parts are in the store already, where the service cannot count them.

Every check first takes the tenant's quota lock (`lock_tenant`), held until the caller's transaction
ends, so a check and the insert it allows are one step per tenant: two concurrent requests of one tenant
cannot both pass a check that only one of them fits."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from core.lifecycle import ACTIVE_STATUSES
from service.database import utcnow
from service.errors import QuotaExceeded, RateLimited
from service.settings import Settings
from service.tables import Artifact, Dataset, Job, OnnxModel, Upload

JOB_RETRY_AFTER_S = 30
FILE_OVERHEAD_BYTES = 4096
# A job stores at most about its model's size again (the quantized model is smaller; fp16 halves it),
# in up to three files (model, external data, report), plus the report's bytes.
JOB_FILES = 3
REPORT_ALLOWANCE_BYTES = 1 << 20


def charge(size_bytes: int, files: int) -> int:
    """What storing `files` files of `size_bytes` in all costs against the quota."""
    return size_bytes + files * FILE_OVERHEAD_BYTES


def job_estimate(model_bytes: int) -> int:
    """What a job on a model of `model_bytes` is expected to store, charged as `charge` does."""
    return charge(model_bytes + REPORT_ALLOWANCE_BYTES, JOB_FILES)


@dataclass(frozen=True)
class StoredBytes:
    """A tenant's stored bytes by kind, and how many files hold them."""

    models: int
    datasets: int
    artifacts: int
    files: int

    @property
    def total(self) -> int:
        return self.models + self.datasets + self.artifacts

    @property
    def charged(self) -> int:
        """What the storage quota counts (see `charge`)."""
        return charge(self.total, self.files)


def stored_bytes_by_kind(session: Session, tenant: str) -> StoredBytes:
    live_model = (OnnxModel.tenant == tenant, OnnxModel.deleted_at.is_(None))
    models = session.execute(
        select(
            func.coalesce(func.sum(OnnxModel.size_bytes), 0),
            func.count(),
            func.coalesce(func.sum(func.json_array_length(OnnxModel.external_data)), 0),
        ).where(*live_model)
    ).one()
    datasets = session.execute(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0), func.count()).where(
            Dataset.tenant == tenant, Dataset.deleted_at.is_(None)
        )
    ).one()
    artifacts = session.execute(
        select(func.coalesce(func.sum(Artifact.size_bytes), 0), func.count())
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant == tenant)
    ).one()
    return StoredBytes(
        models=int(models[0]),
        datasets=int(datasets[0]),
        artifacts=int(artifacts[0]),
        files=int(models[1]) + int(models[2]) + int(datasets[1]) + int(artifacts[1]),
    )


def stored_bytes(session: Session, tenant: str) -> int:
    """What the tenant's stored files count against its storage quota."""
    return stored_bytes_by_kind(session, tenant).charged


def reserved_bytes(session: Session, tenant: str) -> int:
    """What the tenant's queued and running jobs are expected to store once they succeed."""
    total, jobs = session.execute(
        select(func.coalesce(func.sum(OnnxModel.size_bytes), 0), func.count())
        .select_from(Job)
        .join(OnnxModel, OnnxModel.id == Job.model_id)
        .where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    ).one()
    return int(total) + int(jobs) * job_estimate(0)


def open_upload_bytes(session: Session, tenant: str) -> int:
    """What the tenant's open uploads to the object store declared, charged as `charge` does."""
    total, files = session.execute(
        select(
            func.coalesce(func.sum(Upload.size_bytes), 0),
            func.coalesce(func.sum(func.json_array_length(Upload.files)), 0),
        ).where(Upload.tenant == tenant, Upload.status == "open", Upload.expires_at > utcnow())
    ).one()
    return charge(int(total), int(files))


def lock_tenant(session: Session, tenant: str) -> None:
    """Serialize the tenant's quota checks until the session's transaction commits or rolls back.

    PostgreSQL: a transaction-scoped advisory lock on the tenant (other tenants do not wait; taking it
    again in the same transaction is harmless). SQLite allows one writer per database anyway, but the
    driver opens its transaction only at the first write, after the check's reads: so the transaction is
    opened here with `BEGIN IMMEDIATE`, which takes the write lock before the check reads (waiting, as any
    write does, up to the busy timeout). A session already in a transaction holds the write lock already
    (the driver opens one only at a write), so nothing more is needed then."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:tenant))"), {"tenant": tenant})
    elif connection.dialect.name == "sqlite":
        dbapi = connection.connection.dbapi_connection
        if dbapi is not None and not dbapi.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def check_storage(session: Session, settings: Settings, tenant: str, incoming: int) -> None:
    """Raise QuotaExceeded unless `incoming` more charged bytes (see `charge`) fit the tenant's quota."""
    lock_tenant(session, tenant)
    used = stored_bytes(session, tenant) + open_upload_bytes(session, tenant)
    if used + incoming > settings.quota_storage_bytes:
        raise _over_quota(settings, used, incoming, f"Storing {incoming} more bytes")


def check_job_storage(session: Session, settings: Settings, tenant: str, model_bytes: int) -> None:
    """At job creation: the job's estimate must fit beside what is stored and what active jobs will store."""
    lock_tenant(session, tenant)
    used = stored_bytes(session, tenant) + reserved_bytes(session, tenant) + open_upload_bytes(session, tenant)
    incoming = job_estimate(model_bytes)
    if used + incoming > settings.quota_storage_bytes:
        raise _over_quota(
            settings, used, incoming, f"This job's results (estimated at {incoming} bytes from the model's size)"
        )


def _over_quota(settings: Settings, used: int, incoming: int, what: str) -> QuotaExceeded:
    return QuotaExceeded(
        f"{what} would exceed your storage quota of {settings.quota_storage_bytes} bytes ({used} already "
        f"counted, each stored file charged its size plus {FILE_OVERHEAD_BYTES} bytes); delete models, datasets or "
        "old jobs first.",
        detail={
            "quota_bytes": settings.quota_storage_bytes,
            "used_bytes": used,
            "incoming_bytes": incoming,
            "file_overhead_bytes": FILE_OVERHEAD_BYTES,
        },
    )


def check_active_jobs(session: Session, settings: Settings, tenant: str) -> None:
    lock_tenant(session, tenant)
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= settings.quota_active_jobs:
        raise RateLimited(
            f"You already have {active} queued or running jobs, the most allowed; wait for one to finish "
            "or cancel one, then retry.",
            headers={"Retry-After": str(JOB_RETRY_AFTER_S)},
            detail={"quota_active_jobs": settings.quota_active_jobs, "active_jobs": active},
        )
