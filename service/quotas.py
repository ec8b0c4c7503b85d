"""Per-tenant quotas: stored bytes and active (queued + running) jobs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import RateLimited
from service.errors import PayloadTooLarge
from service.settings import Settings
from service.tables import ACTIVE_STATUSES, Artifact, Dataset, Job, OnnxModel

JOB_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class StoredBytes:
    models: int
    datasets: int
    artifacts: int

    @property
    def total(self) -> int:
        return self.models + self.datasets + self.artifacts


def stored_bytes_by_kind(session: Session, tenant: str) -> StoredBytes:
    models = session.scalar(
        select(func.coalesce(func.sum(OnnxModel.size_bytes), 0)).where(
            OnnxModel.tenant == tenant, OnnxModel.deleted_at.is_(None)
        )
    )
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
            Dataset.tenant == tenant, Dataset.deleted_at.is_(None)
        )
    )
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size_bytes), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant == tenant)
    )
    return StoredBytes(int(models or 0), int(datasets or 0), int(artifacts or 0))


def stored_bytes(session: Session, tenant: str) -> int:
    return stored_bytes_by_kind(session, tenant).total


def check_storage(session: Session, settings: Settings, tenant: str, incoming: int) -> None:
    used = stored_bytes(session, tenant)
    if used + incoming > settings.quota_storage_bytes:
        raise PayloadTooLarge(
            f"Storing {incoming} more bytes would exceed your storage quota of {settings.quota_storage_bytes} "
            f"bytes ({used} used); delete models, datasets or old jobs first.",
            code="payload_too_large",
            detail={
                "quota_bytes": settings.quota_storage_bytes,
                "used_bytes": used,
                "incoming_bytes": incoming,
            },
        )


def check_active_jobs(session: Session, settings: Settings, tenant: str) -> None:
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
