"""Calibration and evaluation datasets: validate, store, list, delete."""

from __future__ import annotations

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from core.lifecycle import ACTIVE_STATUSES
from service.database import after_commit, on_rollback, utcnow
from service.errors import Conflict, NotFound
from service.inspection.dataset import DatasetLimits, inspect_dataset, parse_preprocess
from service.quotas import charge, check_storage
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset, Job, clip
from service.upload_stream import StagedPart


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def upload_key(dataset_id: str) -> str:
    """Where a dataset's bytes are stored while the upload is read, before its format is known."""
    return f"{dataset_prefix(dataset_id)}/data"


def create_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    file: StagedPart,
    name: str | None,
    preprocess_raw: str | None,
    dataset_id: str,
) -> Dataset:
    """`file`'s bytes are in storage already, under `upload_key(dataset_id)`, written (and hashed)
    while the request was read: they are inspected where they are, never copied to the API's disk.
    The caller deletes them on a refusal; a rollback after the row was added deletes them too."""
    assert file.stored_key == upload_key(dataset_id), "the route streams the dataset into storage"
    preprocess = parse_preprocess(preprocess_raw)
    limits = DatasetLimits(max_total_bytes=settings.max_dataset_bytes)
    with storage.open_seekable(file.stored_key) as stored:
        info = inspect_dataset(stored, preprocess, limits)
    check_storage(session, settings, tenant, charge(file.size_bytes, 1))
    row = Dataset(
        id=dataset_id,
        tenant=tenant,
        name=clip(name or (file.filename or "dataset").rsplit(".", 1)[0] or "dataset"),
        storage_key=file.stored_key,
        format=info.format,
        num_samples=info.num_samples,
        size_bytes=file.size_bytes,
        sha256=file.sha256,
        tensors=info.tensors,
        has_labels=info.has_labels,
        preprocess=preprocess if info.format == "images" else None,  # arrays are fed as they are
    )
    session.add(row)
    session.flush()
    on_rollback(session, lambda: storage.delete_prefix(dataset_prefix(dataset_id)))
    return row


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    # Another tenant's dataset answers exactly like one that does not exist.
    if row is None or row.deleted_at is not None or row.tenant != tenant:
        raise NotFound(f"No dataset with id {dataset_id!r} exists.", detail={"dataset_id": dataset_id})
    return row


def list_datasets_query(tenant: str) -> Select[Dataset]:
    return select(Dataset).where(Dataset.tenant == tenant, Dataset.deleted_at.is_(None))


def delete_dataset(session: Session, storage: Storage, tenant: str, dataset_id: str) -> None:
    row = get_dataset(session, tenant, dataset_id)
    active = session.scalar(
        select(Job.id)
        .where(
            or_(Job.calibration_dataset_id == dataset_id, Job.evaluation_dataset_id == dataset_id),
            Job.status.in_(ACTIVE_STATUSES),
        )
        .limit(1)
    )
    if active is not None:
        raise Conflict(
            "The dataset is used by a queued or running job; cancel the job or wait for it to finish, then delete.",
            detail={"dataset_id": dataset_id, "job_id": active},
        )
    row.deleted_at = utcnow()
    session.flush()
    prefix = row.storage_prefix
    after_commit(session, lambda: storage.delete_prefix(prefix))
