"""Calibration and evaluation datasets: validate, store, list, delete."""

from __future__ import annotations

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from service.database import after_commit, on_rollback, utcnow
from service.errors import Conflict, NotFound
from service.inspection.dataset import DatasetLimits, inspect_dataset, parse_preprocess
from service.quotas import charge, check_storage
from service.settings import Settings
from service.storage import Storage
from service.tables import ACTIVE_STATUSES, Dataset, Job, clip, new_id
from service.upload_stream import StagedPart
from service.uploads import stage_upload, staging_dir

EXTENSIONS = {"npz": "npz", "npy": "npy", "images": "zip"}


def create_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    file: StagedPart,
    name: str | None,
    preprocess_raw: str | None,
) -> Dataset:
    preprocess = parse_preprocess(preprocess_raw)
    dataset_id = new_id()
    with staging_dir(settings) as folder:
        staged = stage_upload(
            file,
            folder / "upload",
            max_bytes=settings.max_dataset_bytes,
            what="dataset file",
            chunk_size=settings.upload_chunk_bytes,
        )
        info = inspect_dataset(staged.path, preprocess, DatasetLimits(max_total_bytes=settings.max_dataset_bytes))
        key = f"datasets/{dataset_id}/data.{EXTENSIONS[info.format]}"
        check_storage(session, settings, tenant, charge(staged.size_bytes, 1))
        row = Dataset(
            id=dataset_id,
            tenant=tenant,
            name=clip(name or (file.filename or "dataset").rsplit(".", 1)[0] or "dataset"),
            storage_key=key,
            format=info.format,
            num_samples=info.num_samples,
            size_bytes=staged.size_bytes,
            sha256=staged.sha256,
            tensors=info.tensors,
            has_labels=info.has_labels,
            preprocess=preprocess if info.format == "images" else None,  # arrays are fed as they are
        )
        # The row first, as for models: a refused insert stores nothing, a rollback removes the file.
        session.add(row)
        session.flush()
        on_rollback(session, lambda: storage.delete_prefix(f"datasets/{dataset_id}"))
        storage.put_file(key, staged.path, move=True, sha256=staged.sha256)
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
