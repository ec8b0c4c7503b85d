"""A tenant's usage: stored bytes by kind, job counts by status, and the quotas they count against."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.quotas import stored_bytes_by_kind
from service.settings import Settings
from service.tables import Dataset, Job, OnnxModel
from service.usage.schemas import JobCounts, StorageUsage, Usage


def usage(session: Session, settings: Settings, tenant: str) -> Usage:
    stored = stored_bytes_by_kind(session, tenant)
    by_status = dict(
        session.execute(select(Job.status, func.count()).where(Job.tenant == tenant).group_by(Job.status))
        .tuples()
        .all()
    )
    models = session.scalar(
        select(func.count()).select_from(OnnxModel).where(OnnxModel.tenant == tenant, OnnxModel.deleted_at.is_(None))
    )
    datasets = session.scalar(
        select(func.count()).select_from(Dataset).where(Dataset.tenant == tenant, Dataset.deleted_at.is_(None))
    )
    return Usage(
        tenant=tenant,
        storage=StorageUsage(
            total_bytes=stored.total,
            models_bytes=stored.models,
            datasets_bytes=stored.datasets,
            artifacts_bytes=stored.artifacts,
            files=stored.files,
            quota_used_bytes=stored.charged,
            quota_bytes=settings.quota_storage_bytes,
        ),
        jobs=JobCounts(**by_status, active_quota=settings.quota_active_jobs),
        models=models or 0,
        datasets=datasets or 0,
        rate_limit_per_minute=settings.rate_limit_per_minute,
    )
