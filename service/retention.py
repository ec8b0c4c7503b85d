"""`QAAS_RETENTION_DAYS`: models, datasets and ended jobs older than that are removed (off by default).
Run by the workers' periodic sweep. Nothing a queued or running job needs is touched; models and
datasets are soft-deleted like `DELETE` does (their rows stay for the history of old jobs), jobs are
removed with their artifacts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.lifecycle import ACTIVE_STATUSES
from service.database import after_commit, transaction, utcnow
from service.storage import Storage
from service.tables import Artifact, Dataset, Job, OnnxModel

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
