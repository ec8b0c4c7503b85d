"""Stored objects no database row points at: what an API or a worker left when it died between storing an
upload's (or a job's) files and recording them, or before a failed request's cleanup ran. Swept at the API's
start (`start_sweep`), once they are older than QAAS_ORPHAN_GRACE_S.

Nothing in progress is touched. Every upload and job writes its objects first and commits its row after, so
an object without a row may be one whose row is about to land: only objects older than the grace go, and the
rows are read after the objects are listed, so a row that landed meanwhile keeps its objects. A queued or
running job keeps everything under its folder (its attempts store before they record), and an upload to the
store keeps its files from its start. Keys outside the service's own folders are never touched. The one
limit: an upload request that outlasts the grace (a day by default) between its first byte stored and its
row committed could lose its files, since on S3 an object sent in parts counts from the start of its upload.

On S3, the multipart uploads a dead process never completed hold their parts (billed, and listed by no
listing of objects): those whose parts are all older than the grace, that no row names, are aborted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import TypeVar

from sqlalchemy import ColumnElement, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.lifecycle import ACTIVE_STATUSES
from service.database import transaction, utcnow
from service.storage import DirectUploads, ListedObject, ObjectMissing, Storage, UnfinishedUpload
from service.tables import Artifact, Dataset, Job, OnnxModel, Upload

log = logging.getLogger(__name__)
T = TypeVar("T")
BATCH = 500  # objects whose rows are read in one query per kind
# The folders the service writes, by what names their second part: models/<model id>/<file>,
# datasets/<dataset id>/data, jobs/<job id>/<attempt>/<artifact>, uploads/<model id>/<archive> (a .zip of
# external data while its files are taken out; never recorded), .tmp/<name>.part (the local store's writes
# in progress; never recorded).
FOLDERS = ("models", "datasets", "jobs", "uploads", ".tmp")


@dataclass(frozen=True)
class Swept:
    objects: list[str]  # the keys of the objects deleted
    uploads: list[str]  # the keys of the multipart uploads aborted


def sweep_orphans(
    factory: sessionmaker[Session],
    storage: Storage,
    older_than_s: float,
    *,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> Swept:
    """Delete every object under the service's folders that is older than `older_than_s` and that no row
    points at, and abort every such multipart upload (S3). `stop` ends it early (the API is shutting down)."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    removed: list[str] = []
    for folder in FOLDERS:
        old = (obj for obj in _until(storage.listing(folder), stop) if obj.modified_at < cutoff)
        for batch in _batches(old, BATCH):
            with transaction(factory) as session:
                kept = _kept(session, folder, batch)
            for obj in batch:
                if obj.key in kept:
                    continue
                try:
                    storage.delete(obj.key)
                except (OSError, ValueError) as exc:  # the next start tries again
                    log.warning("could not delete the orphaned object %s: %s", obj.key, exc)
                    continue
                removed.append(obj.key)
    direct = storage.direct_uploads()
    aborted = [] if direct is None else _abort_unfinished(factory, direct, cutoff, stop)
    if removed or aborted:
        log.warning(
            "removed %d stored object(s) and %d unfinished upload(s) no row points at: %s",
            len(removed),
            len(aborted),
            (removed + aborted)[:20],
        )
    return Swept(removed, aborted)


def _abort_unfinished(
    factory: sessionmaker[Session], direct: DirectUploads, cutoff: datetime, stop: threading.Event | None
) -> list[str]:
    """The multipart uploads started before the cutoff that no upload row names and no busy job may still
    complete, and whose parts are all older than the cutoff too: one still being written (an API streaming a
    large file into the store) keeps sending parts. One without parts holds no bytes and stays: it may be a
    moment old (a store's start time is not always true: moto's is a fixed date). Their keys."""
    aborted: list[str] = []
    for folder in FOLDERS:
        old = (u for u in _until(direct.unfinished_uploads(folder), stop) if u.started_at < cutoff)
        for batch in _batches(old, BATCH):
            with transaction(factory) as session:
                kept = _kept_uploads(session, folder, batch)
            for upload in batch:
                if upload.upload_id in kept:
                    continue
                try:
                    parts = direct.uploaded_parts(upload.key, upload.upload_id)
                    if not parts or any(p.modified_at is None or p.modified_at >= cutoff for p in parts):
                        continue
                    direct.abort_upload(upload.key, upload.upload_id)
                except ObjectMissing:  # completed or aborted meanwhile
                    continue
                except (OSError, ValueError) as exc:
                    log.warning("could not abort the unfinished upload to %s: %s", upload.key, exc)
                    continue
                aborted.append(upload.key)
    return aborted


@dataclass
class Sweep:
    thread: threading.Thread
    stop: threading.Event


def start_sweep(factory: sessionmaker[Session], storage: Storage, older_than_s: float) -> Sweep:
    """`sweep_orphans` on a thread of its own, so that listing a large store does not hold up the API's start;
    a store or database that fails is logged (the next start tries again). Set `stop` to end it early."""
    stop = threading.Event()

    def run() -> None:
        try:
            sweep_orphans(factory, storage, older_than_s, stop=stop)
        except Exception:  # a sweep that fails must not take the API down
            log.warning("the sweep of orphaned stored objects failed; the next start tries again", exc_info=True)

    thread = threading.Thread(target=run, name="qaas-orphan-sweep", daemon=True)
    thread.start()
    return Sweep(thread, stop)


def _until(items: Iterator[T], stop: threading.Event | None) -> Iterator[T]:
    for obj in items:
        if stop is not None and stop.is_set():
            return
        yield obj


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _owner(key: str) -> str:
    """The id a key's second part names (`models/<id>/...` -> `<id>`)."""
    parts = key.split("/")
    return parts[1] if len(parts) > 2 else ""


def _kept(session: Session, folder: str, batch: list[ListedObject]) -> set[str]:
    """The keys of the batch some row points at (or that a busy job may still record)."""
    keys = {obj.key for obj in batch}
    owners = {_owner(key) for key in keys} - {""}
    if folder == "models":
        return keys & _model_keys(session, owners)
    if folder == "datasets":
        return keys & _dataset_keys(session, keys)
    if folder == "jobs":
        return keys & _job_keys(session, keys, owners)
    return set()  # uploads/ and .tmp/: no row ever points at them


def _kept_uploads(session: Session, folder: str, batch: list[UnfinishedUpload]) -> set[str]:
    """The ids of the batch's multipart uploads an upload row names, or that a busy job may still complete."""
    owners = {_owner(upload.key) for upload in batch} - {""}
    if folder == "models":  # a direct upload's files (the sweep of expired uploads aborts them)
        files = session.scalars(select(Upload.files).where(Upload.model_id.in_(owners)))
        return {str(f.get("upload_id")) for listed in files for f in listed}
    if folder == "jobs":
        running = set(session.scalars(select(Job.id).where(Job.id.in_(owners), _busy())))
        return {upload.upload_id for upload in batch if _owner(upload.key) in running}
    return set()


def _busy() -> ColumnElement[bool]:
    """A job that may still read its inputs or record files: queued, running, or measured elsewhere."""
    return or_(Job.status.in_(ACTIVE_STATUSES), Job.measurements_pending.is_(True))


def _model_keys(session: Session, model_ids: set[str]) -> set[str]:
    kept: set[str] = set()
    # An upload to the store first: its row exists before its files do, and until after its model's row lands.
    for files in session.scalars(select(Upload.files).where(Upload.model_id.in_(model_ids))):
        kept.update(str(f["key"]) for f in files)
    in_use = exists().where(Job.model_id == OnnxModel.id, _busy())
    rows = session.execute(
        select(OnnxModel.storage_prefix, OnnxModel.file_name, OnnxModel.external_data).where(
            OnnxModel.storage_prefix.in_([f"models/{model_id}" for model_id in model_ids]),
            or_(OnnxModel.deleted_at.is_(None), in_use),
        )
    )
    for prefix, file_name, external_data in rows:
        kept.add(f"{prefix}/{file_name}")
        kept.update(f"{prefix}/{entry['name']}" for entry in external_data or [])
    return kept


def _dataset_keys(session: Session, keys: set[str]) -> set[str]:
    uses = or_(Job.calibration_dataset_id == Dataset.id, Job.evaluation_dataset_id == Dataset.id)
    live = or_(Dataset.deleted_at.is_(None), exists().where(uses, _busy()))
    return set(session.scalars(select(Dataset.storage_key).where(Dataset.storage_key.in_(keys), live)))


def _job_keys(session: Session, keys: set[str], job_ids: set[str]) -> set[str]:
    # The jobs first, then their artifacts: a job that ends between the two reads was still running at the
    # first (all its folder kept), and one that had ended by then had its artifact rows committed with its end.
    running = set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), _busy())))
    kept = {key for key in keys if _owner(key) in running}
    kept.update(session.scalars(select(Artifact.storage_key).where(Artifact.storage_key.in_(keys))))
    return kept
