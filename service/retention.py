"""`QAAS_RETENTION_DAYS`: models, datasets and ended jobs older than that are removed (off by default).
Run by the workers' periodic sweep. Nothing a queued or running job needs is touched; models and
datasets are soft-deleted like `DELETE` does (their rows stay for the history of old jobs), jobs are
removed with their artifacts. Uploads to the object store left open past their `expires_at`
(`QAAS_DIRECT_UPLOAD_EXPIRES_S`) are aborted by the same sweep, always (`sweep_uploads`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.lifecycle import ACTIVE_STATUSES
from service.database import after_commit, transaction, utcnow
from service.storage import Storage
from service.tables import Artifact, Dataset, Job, OnnxModel, Upload

log = logging.getLogger(__name__)
BATCH = 500  # rows per kind per sweep; a large backlog goes over several sweeps


@dataclass(frozen=True)
class Removed:
    jobs: int
    models: int
    datasets: int


def sweep(factory: sessionmaker[Session], storage: Storage, days: float) -> Removed:
    cutoff = utcnow() - timedelta(days=days)
    with transaction(factory) as session:
        jobs = _jobs(session, storage, cutoff)
        models = _models(session, storage, cutoff)
        datasets = _datasets(session, storage, cutoff)
    removed = Removed(jobs, models, datasets)
    if jobs or models or datasets:
        log.info("retention (%s days): removed %s", days, removed)
    return removed


def sweep_uploads(factory: sessionmaker[Session], storage: Storage) -> int:
    """Forget the uploads whose time is up. An open one is aborted: its parts are removed from the store
    before its row goes (a store that fails keeps the row for the next sweep); so are a deleted one's
    files, once more. A completed one's files are its model's. Rows a completion holds right now are
    skipped (PostgreSQL; its claim also refuses an expired upload)."""
    with transaction(factory) as session:
        query = select(Upload).where(Upload.expires_at < utcnow()).with_for_update(skip_locked=True).limit(BATCH)
        rows = list(session.scalars(query))
        for row in rows:
            if row.status != "completed":
                storage.delete_prefix(row.storage_prefix)
            session.delete(row)
    if rows:
        log.info(
            "uploads: %d expired, %d of them never completed", len(rows), sum(r.status != "completed" for r in rows)
        )
    return len(rows)


def _jobs(session: Session, storage: Storage, cutoff: datetime) -> int:
    ended = Job.status.notin_(ACTIVE_STATUSES)
    old = func.coalesce(Job.finished_at, Job.created_at) < cutoff
    ids = list(session.scalars(select(Job.id).where(ended, old).limit(BATCH)))
    if not ids:
        return 0
    session.execute(delete(Artifact).where(Artifact.job_id.in_(ids)))
    session.execute(delete(Job).where(Job.id.in_(ids), ended))
    after_commit(session, lambda: _delete_all(storage, [f"jobs/{job_id}" for job_id in ids]))
    return len(ids)


def _delete_all(storage: Storage, prefixes: list[str]) -> None:
    for prefix in prefixes:
        storage.delete_prefix(prefix)


def _models(session: Session, storage: Storage, cutoff: datetime) -> int:
    in_use = exists().where(Job.model_id == OnnxModel.id, Job.status.in_(ACTIVE_STATUSES))
    old = OnnxModel.deleted_at.is_(None) & (OnnxModel.created_at < cutoff)
    rows = list(session.scalars(select(OnnxModel).where(old, ~in_use).limit(BATCH)))
    return _mark_deleted(session, storage, rows, [row.storage_prefix for row in rows])


def _datasets(session: Session, storage: Storage, cutoff: datetime) -> int:
    uses = or_(Job.calibration_dataset_id == Dataset.id, Job.evaluation_dataset_id == Dataset.id)
    in_use = exists().where(uses, Job.status.in_(ACTIVE_STATUSES))
    old = Dataset.deleted_at.is_(None) & (Dataset.created_at < cutoff)
    rows = list(session.scalars(select(Dataset).where(old, ~in_use).limit(BATCH)))
    return _mark_deleted(session, storage, rows, [row.storage_prefix for row in rows])


def _mark_deleted(
    session: Session, storage: Storage, rows: list[OnnxModel] | list[Dataset], prefixes: list[str]
) -> int:
    now = utcnow()
    for row in rows:
        row.deleted_at = now
    after_commit(session, lambda: _delete_all(storage, prefixes))
    return len(rows)
