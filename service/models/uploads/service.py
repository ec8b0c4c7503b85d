"""Uploads straight to the object store: `create_upload` starts a multipart upload per declared
external-data file, under the keys of the model it will become, and hands out presigned part URLs;
the client PUTs the bytes to the store; `complete_upload` checks the parts, runs the model upload's
own path (`create_model`: the graph staged and inspected, the external data checked by its declared
sizes), then joins the parts into the model's files.

Sizes are checked at completion against the parts the store holds. A declared sha256 is recorded as
given and checked by the worker that first downloads the file (worker/inputs.py): a file whose bytes
differ fails its job with `input_corrupt`. A file without one is read back once here and hashed."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from service.database import after_commit, on_rollback, utcnow
from service.errors import Conflict, InvalidModel, NotFound, PayloadTooLarge, ServiceError
from service.models.service import (
    MAX_FILES_PER_UPLOAD,
    create_model,
    model_prefix,
    usable_external_data_name,
)
from service.models.uploads.schemas import UploadFileIn
from service.quotas import charge, check_storage
from service.settings import Settings
from service.storage import DirectUploads, ObjectMissing, Storage, UploadedPart
from service.tables import OnnxModel, Upload, new_id
from service.upload_stream import StagedPart

MAX_PARTS = 10_000  # per multipart upload (S3)
MIB = 1 << 20
STARTS_AT_ONCE = 8  # multipart uploads started in parallel by one request
_REPORTED = 20  # part numbers named in a message at most


@dataclass(frozen=True)
class Part:
    number: int
    size_bytes: int
    offset: int
    url: str


def part_sizes(size_bytes: int, part_bytes: int) -> list[int]:
    """The sizes of a file's parts: `part_bytes` each, the last one the rest (one empty part for an empty
    file: a multipart upload holds one part at least)."""
    count = max(1, math.ceil(size_bytes / part_bytes))
    return [part_bytes] * (count - 1) + [size_bytes - part_bytes * (count - 1)]


def file_part_bytes(size_bytes: int, part_bytes: int) -> int:
    """`part_bytes`, or larger (whole MiB) where the file would need more than MAX_PARTS parts."""
    needed = math.ceil(size_bytes / MAX_PARTS)
    return max(part_bytes, math.ceil(needed / MIB) * MIB)


def _direct(storage: Storage) -> DirectUploads:
    direct = storage.direct_uploads()
    if direct is None:
        raise Conflict(
            "This service keeps its files itself, not in an object store, so it hands out no upload URLs; "
            "send the external data with the model to POST /v1/models (field `external_data`).",
            code="direct_uploads_unavailable",
        )
    return direct


def create_upload(
    session: Session, storage: Storage, settings: Settings, tenant: str, files: list[UploadFileIn]
) -> Upload:
    direct = _direct(storage)
    if len(files) >= MAX_FILES_PER_UPLOAD:
        raise PayloadTooLarge(
            f"The upload declares {len(files)} files; with the model it would hold more than "
            f"{MAX_FILES_PER_UPLOAD} files, the most one upload may have; keep the model's weights in fewer files.",
            detail={"limit_files": MAX_FILES_PER_UPLOAD},
        )
    names: list[str] = []
    for file in files:
        name = usable_external_data_name(file.name)
        if name.lower().endswith(".zip"):
            raise InvalidModel(
                f"{name!r} is a .zip: the object store cannot unpack it; declare the files it holds instead "
                "(or send the .zip with the model to POST /v1/models).",
                detail={"file_name": name},
            )
        if name in names:
            raise InvalidModel(f"External data file {name!r} is declared twice.", detail={"file_name": name})
        names.append(name)
    total = sum(f.size_bytes for f in files)
    if total > settings.max_model_bytes:
        raise PayloadTooLarge(
            f"The files declared hold {total} bytes, more than the limit of {settings.max_model_bytes} bytes for a "
            "model upload; upload a smaller model or ask the operator to raise the limit.",
            detail={"limit_bytes": settings.max_model_bytes},
        )
    check_storage(session, settings, tenant, charge(total, len(files)))
    model_id = new_id()
    keys = [f"{model_prefix(model_id)}/{name}" for name in names]
    upload_ids = _start_all(direct, keys)
    now = utcnow()
    row = Upload(
        tenant=tenant,
        model_id=model_id,
        status="open",
        files=[
            {
                "name": name,
                "size_bytes": file.size_bytes,
                "sha256": file.sha256,
                "key": key,
                "upload_id": upload_id,
                "part_bytes": file_part_bytes(file.size_bytes, settings.direct_upload_part_bytes),
            }
            for name, file, key, upload_id in zip(names, files, keys, upload_ids, strict=True)
        ],
        size_bytes=total,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.direct_upload_expires_s),
    )
    prefix = row.storage_prefix
    on_rollback(session, lambda: storage.delete_prefix(prefix))  # before the flush, which may fail too
    session.add(row)
    session.flush()
    return row


def _start_all(direct: DirectUploads, keys: list[str]) -> list[str]:
    """A multipart upload for each key (a few at once); none is left open when one fails to start."""
    with ThreadPoolExecutor(min(STARTS_AT_ONCE, len(keys)), thread_name_prefix="qaas-upload-start") as pool:
        futures = [pool.submit(direct.start_upload, key) for key in keys]
        wait(futures)
    failed = next((f.exception() for f in futures if f.exception() is not None), None)
    if failed is not None:
        for key, future in zip(keys, futures, strict=True):
            if future.exception() is None:
                direct.abort_upload(key, future.result())
        raise failed
    return [future.result() for future in futures]


def get_upload(session: Session, tenant: str, upload_id: str) -> Upload:
    """An open or completed upload of the tenant's; another tenant's, a deleted or an expired one is not found."""
    row = session.get(Upload, upload_id)
    if (
        row is None
        or row.tenant != tenant
        or row.status == "aborted"
        or (row.status == "open" and row.expires_at <= utcnow())
    ):
        raise NotFound(
            f"No upload with id {upload_id!r} exists (it may have been deleted, or expired); start a new one "
            "with POST /v1/uploads.",
            detail={"upload_id": upload_id},
        )
    return row


def parts(storage: Storage, row: Upload) -> dict[str, list[Part]]:
    """Each file's parts with a URL valid until the upload expires; none once it is completed."""
    if row.status != "open":
        return {f["name"]: [] for f in row.files}
    direct = _direct(storage)
    expires_s = max(1, int((row.expires_at - utcnow()).total_seconds()))
    found: dict[str, list[Part]] = {}
    for f in row.files:
        sizes = part_sizes(f["size_bytes"], f["part_bytes"])
        found[f["name"]] = [
            Part(
                number,
                size,
                (number - 1) * f["part_bytes"],
                direct.part_url(f["key"], f["upload_id"], number, size, expires_s=expires_s),
            )
            for number, size in enumerate(sizes, start=1)
        ]
    return found


def delete_upload(session: Session, storage: Storage, tenant: str, upload_id: str) -> None:
    row = get_upload(session, tenant, upload_id)
    if row.status == "completed":
        raise Conflict(
            f"The upload was completed into model {row.model_id}; delete the model instead.",
            detail={"upload_id": upload_id, "model_id": row.model_id},
        )
    aborted = session.execute(
        update(Upload).where(Upload.id == row.id, Upload.status == "open").values(status="aborted")
    )
    if not isinstance(aborted, CursorResult) or aborted.rowcount != 1:
        raise _busy(upload_id)
    prefix = row.storage_prefix
    after_commit(session, lambda: storage.delete_prefix(prefix))


def complete_upload(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    upload_id: str,
    file: StagedPart,
    sha256s: Mapping[str, str],
    name: str | None,
) -> OnnxModel:
    """The model from the graph `file` and the upload's files, recorded as `POST /v1/models` records a
    model with external data. Refused before anything changes (the upload stays open, to be completed
    again or deleted) when a part is missing or of the wrong size, or the graph is refused."""
    direct = _direct(storage)
    row = get_upload(session, tenant, upload_id)
    if row.status == "completed":
        raise Conflict(
            f"The upload was completed already, into model {row.model_id}.",
            detail={"upload_id": upload_id, "model_id": row.model_id},
        )
    declared = _declared_sha256(row, sha256s)
    listed = {f["name"]: _checked_parts(direct, upload_id, f) for f in row.files}
    # Claimed in this transaction: a concurrent completion or the sweep finds it taken, and the quota
    # no longer counts what it declared (the model's files are counted instead).
    now = utcnow()
    claim = update(Upload).where(Upload.id == row.id, Upload.status == "open", Upload.expires_at > now)
    claimed = session.execute(claim.values(status="completed", completed_at=now))
    if not isinstance(claimed, CursorResult) or claimed.rowcount != 1:
        raise _busy(upload_id)
    staged = [
        StagedPart(f["name"], Path(), f["size_bytes"], declared.get(f["name"]) or "", f["key"]) for f in row.files
    ]
    model = create_model(session, storage, settings, tenant, file, staged, name, row.model_id)
    # The model's row is flushed: from here on a failure rolls back and takes its stored files with it.
    kept = {e["name"] for e in model.external_data}
    for f in row.files:
        if f["name"] not in kept:  # a file the graph does not read is not kept (as in POST /v1/models)
            direct.abort_upload(f["key"], f["upload_id"])
    by_name = {f["name"]: f for f in row.files}
    recorded: list[dict[str, Any]] = []
    for entry in model.external_data:
        f = by_name[entry["name"]]
        try:
            direct.complete_upload(f["key"], f["upload_id"], listed[f["name"]])
        except ObjectMissing as exc:
            raise _parts_gone(upload_id) from exc
        recorded.append({**entry, "sha256": entry["sha256"] or _hash_stored(storage, f["key"])})
    model.external_data = recorded
    return model


def _declared_sha256(row: Upload, sha256s: Mapping[str, str]) -> dict[str, str]:
    names = {f["name"] for f in row.files}
    unknown = sorted(set(sha256s) - names)
    if unknown:
        raise InvalidModel(
            f"`external_data_sha256` names {unknown[0]!r}, which the upload does not declare.",
            detail={"file_name": unknown[0], "declared": sorted(names)[:_REPORTED]},
        )
    declared: dict[str, str] = {}
    for f in row.files:
        given, before = sha256s.get(f["name"]), f["sha256"]
        if given and before and given != before:
            raise InvalidModel(
                f"The sha256 given for {f['name']!r} at completion differs from the one declared when the upload "
                "was started.",
                detail={"file_name": f["name"], "declared": before, "given": given},
            )
        if given or before:
            declared[f["name"]] = str(given or before)
    return declared


def _checked_parts(direct: DirectUploads, upload_id: str, f: dict[str, Any]) -> list[UploadedPart]:
    """The parts the store holds for the file, exactly those of its plan; else 422 `upload_incomplete`."""
    try:
        held = direct.uploaded_parts(f["key"], f["upload_id"])
    except ObjectMissing as exc:
        raise _parts_gone(upload_id) from exc
    sizes = part_sizes(f["size_bytes"], f["part_bytes"])
    by_number = {p.number: p for p in held}
    missing = [n for n in range(1, len(sizes) + 1) if n not in by_number]
    wrong = sorted(n for n, p in by_number.items() if n > len(sizes) or p.size_bytes != sizes[n - 1])
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"parts {_numbers(missing)} are missing")
        if wrong:
            problems.append(f"parts {_numbers(wrong)} are not of their size (or not in the plan)")
        raise ServiceError(
            f"The file {f['name']!r} is not uploaded as declared ({f['size_bytes']} bytes in {len(sizes)} parts): "
            f"{' and '.join(problems)}; PUT those parts to their URLs again (GET /v1/uploads/{{id}}), then complete.",
            status=422,
            code="upload_incomplete",
            detail={
                "file_name": f["name"],
                "missing_parts": missing[:_REPORTED],
                "wrong_parts": wrong[:_REPORTED],
            },
        )
    return [by_number[n] for n in range(1, len(sizes) + 1)]


def _numbers(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:_REPORTED]))
    return shown + (f" and {len(numbers) - _REPORTED} more" if len(numbers) > _REPORTED else "")


def _hash_stored(storage: Storage, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.iter_bytes(key):
        digest.update(chunk)
    return digest.hexdigest()


def _busy(upload_id: str) -> Conflict:
    return Conflict(
        "The upload is being completed or deleted by another request; look at GET /v1/uploads/{id}.",
        detail={"upload_id": upload_id},
    )


def _parts_gone(upload_id: str) -> Conflict:
    return Conflict(
        "The object store no longer holds this upload's parts (it was completed or aborted there); start a new "
        "upload with POST /v1/uploads.",
        detail={"upload_id": upload_id},
    )
