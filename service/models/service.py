"""Uploaded ONNX models: validate, store, list, delete."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from core.lifecycle import ACTIVE_STATUSES
from core.model import ModelFacts, TensorSpec, model_facts
from core.recipe import MAX_NAME_CHARS
from service.database import after_commit, on_rollback, utcnow
from service.errors import Conflict, InvalidModel, NotFound, PayloadTooLarge
from service.inspection.archive import (
    MAX_FILE_NAME_BYTES,
    ArchiveLimits,
    extract_flat_to_storage,
    read_directory,
    safe_member_name,
)
from service.inspection.model import ModelInfo, ModelLimits, inspect_model
from service.quotas import charge, check_storage
from service.settings import Settings
from service.storage import Storage
from service.tables import Job, OnnxModel, clip, new_id
from service.upload_stream import StagedPart
from service.uploads import check_size, stage_upload, staging_dir

MODEL_FILE = "model.onnx"
MAX_FILES_PER_UPLOAD = 1000


def model_prefix(model_id: str) -> str:
    return f"models/{model_id}"


def archives_prefix(model_id: str) -> str:
    """Where a .zip of external data is kept while its files are taken out of it: outside the model's
    folder, so that no file in the archive can be stored over the archive itself."""
    return f"uploads/{model_id}"


def create_model(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    file: StagedPart,
    external_data: list[StagedPart],
    name: str | None,
    model_id: str | None = None,
) -> OnnxModel:
    """`model_id`: chosen by the caller when external data went straight to storage under
    `external_data_key(model_id, ...)` while the request was read (the caller deletes it all when
    the model is refused)."""
    model_id = model_id or new_id()
    prefix = model_prefix(model_id)
    with staging_dir(settings) as folder:
        upload = stage_upload(
            file,
            folder / MODEL_FILE,
            max_bytes=settings.max_model_bytes,
            what="model file",
        )
        remaining = settings.max_model_bytes - upload.size_bytes
        hashes = {MODEL_FILE: upload.sha256}  # filled while staging, so no file is read twice
        in_storage: dict[str, str] = {}  # external data whose bytes went straight to storage
        for extra in external_data:
            remaining -= _stage_external(extra, folder, storage, prefix, remaining, hashes, in_storage)
        if any((e.stored_key or "").startswith(archives_prefix(model_id) + "/") for e in external_data):
            storage.delete_prefix(archives_prefix(model_id))  # their files are out: the archives go
        info = inspect_model(folder / MODEL_FILE, ModelLimits())
        # Only what the model reads is kept: other files would cost inodes and bytes for nothing.
        referenced = {os.path.normpath(location) for location in info.external_data}
        external: list[dict[str, Any]] = [
            {"name": path.name, "size_bytes": path.stat().st_size, "sha256": hashes[path.name]}
            for path in sorted(folder.iterdir())
            if path.name in referenced and path.is_file()
        ]
        for unread in set(in_storage) - referenced:
            storage.delete(in_storage.pop(unread))
        size_bytes = upload.size_bytes + sum(e["size_bytes"] for e in external)
        check_storage(session, settings, tenant, charge(size_bytes, 1 + len(external)))
        row = OnnxModel(
            id=model_id,
            tenant=tenant,
            name=clip(name or Path(file.filename or MODEL_FILE).stem or "model"),
            storage_prefix=prefix,
            file_name=MODEL_FILE,
            sha256=upload.sha256,
            size_bytes=size_bytes,
            external_data=external,
            **_info_columns(info),
        )
        # The row first: whatever the database refuses, it refuses before a file is stored, and a
        # transaction that rolls back later takes the stored files with it.
        session.add(row)
        session.flush()
        on_rollback(session, lambda: storage.delete_prefix(prefix))
        for stored, digest in [(MODEL_FILE, upload.sha256), *((e["name"], e["sha256"]) for e in external)]:
            if stored not in in_storage:  # else its bytes are at its key already
                storage.put_file(f"{prefix}/{stored}", folder / stored, move=True, sha256=digest)
    return row


def _info_columns(info: ModelInfo) -> dict[str, object]:
    data = asdict(info)
    return {
        "ir_version": data["ir_version"],
        "opset": data["opset"],
        "producer": clip(data["producer"]),
        "inputs": data["inputs"],
        "outputs": data["outputs"],
        "op_counts": data["op_counts"],
        "node_names": stored_node_names(data["node_names"]),
        "quantization": data["quantization"],
    }


def stored_node_names(names: Iterable[str]) -> list[str]:
    """Node names as stored: each clipped to MAX_NAME_CHARS, the longest a recipe may name, so a model
    of 100,000-character names does not store them whole. A recipe naming a clipped name's first
    MAX_NAME_CHARS characters passes the check at job creation; the quantizer, which reads the model's
    own names, then warns that no such node exists (worker/engine/quantize.py)."""
    return [name[:MAX_NAME_CHARS] for name in names]


def stored_facts(model: OnnxModel, storage: Storage) -> ModelFacts:
    """The facts the recipe and dataset rules need, as recorded at upload. A model uploaded before
    node names were recorded has them read from its file once, and recorded."""
    if model.node_names is None:
        with storage.open(f"{model.storage_prefix}/{model.file_name}") as fp:
            model.node_names = stored_node_names(model_facts(onnx.load(fp, load_external_data=False)).node_names)
    return ModelFacts(
        opset=model.opset,
        op_counts=model.op_counts,
        node_names=tuple(model.node_names),
        inputs=tuple(TensorSpec.from_mapping(i) for i in model.inputs),
        outputs=tuple(TensorSpec.from_mapping(o) for o in model.outputs),
        ir_version=model.ir_version,
    )


def _stage_external(
    upload: StagedPart,
    folder: Path,
    storage: Storage,
    prefix: str,
    budget: int,
    hashes: dict[str, str],
    in_storage: dict[str, str],
) -> int:
    """Place one external-data upload (a file, or a .zip of files) beside the model; return its bytes.
    Its bytes are in storage already (`external_data_key`): the model's folder gets a sparse
    placeholder of each file (its name and size, which is what the model's checks read), `hashes`
    each file's sha256 and `in_storage` its key. A .zip is read where it is stored and its files are
    streamed out of it into storage under the model's prefix. At most MAX_FILES_PER_UPLOAD files in
    all, counting the model."""
    client_name = upload.filename or ""
    safe = usable_external_data_name(client_name)
    if upload.stored_key is None:
        raise _unusable_name(client_name)
    check_size(upload, budget, "external data")
    files_left = MAX_FILES_PER_UPLOAD - sum(1 for _ in folder.iterdir())
    if safe.lower().endswith(".zip"):
        with storage.open_seekable(upload.stored_key) as archive:
            if read_directory(archive, InvalidModel).entries > files_left:
                raise _too_many_files()
            limits = ArchiveLimits(max_entries=max(files_left, 0), max_total_bytes=budget)
            store = lambda name: storage.writer(f"{prefix}/{name}")  # noqa: E731
            extracted = extract_flat_to_storage(archive, folder, store, limits, error_cls=InvalidModel)
        for path, stored in extracted:
            hashes[path.name], in_storage[path.name] = stored.sha256, stored.key
        return sum(stored.size_bytes for _, stored in extracted)
    if files_left <= 0:
        raise _too_many_files()
    dest = folder / safe
    if dest.exists():
        raise InvalidModel(f"External data file {safe!r} was uploaded twice.", detail={"file_name": safe})
    stage_upload(upload, dest, max_bytes=budget, what="external data")
    hashes[safe], in_storage[safe] = upload.sha256, upload.stored_key
    return upload.size_bytes


def external_data_name(client_name: str) -> str | None:
    """The name an external data file is kept under, from the client's file name; None: unusable."""
    safe = safe_member_name(client_name.replace("\\", "/").rsplit("/", 1)[-1]) if client_name else None
    if not safe or safe == MODEL_FILE or len(safe.encode()) > MAX_FILE_NAME_BYTES:
        return None
    return safe


def usable_external_data_name(client_name: str) -> str:
    """`external_data_name`, or InvalidModel that says how to name the file."""
    safe = external_data_name(client_name)
    if safe is None:
        raise _unusable_name(client_name)
    return safe


def _unusable_name(client_name: str) -> InvalidModel:
    return InvalidModel(
        f"External data file name {client_name[:100]!r} is not usable; name each file exactly as the "
        f"model's external-data `location` refers to it (at most {MAX_FILE_NAME_BYTES} bytes).",
        detail={"file_name": client_name[:MAX_FILE_NAME_BYTES]},
    )


def external_data_key(model_id: str, client_name: str, index: int) -> str | None:
    """Where an external data upload is stored while the request is still being read: a plain file
    at its final key, the `index`th file of the form, a .zip, beside the model's folder until its
    files are taken out; None for a name that will be refused (the file is staged, and ignored)."""
    safe = external_data_name(client_name)
    if safe is None:
        return None
    if safe.lower().endswith(".zip"):
        return f"{archives_prefix(model_id)}/{index}.zip"
    return f"{model_prefix(model_id)}/{safe}"


def _too_many_files() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The upload holds more than {MAX_FILES_PER_UPLOAD} files (the model and its external data); "
        "keep the model's weights in fewer files.",
        detail={"limit_files": MAX_FILES_PER_UPLOAD},
    )


def get_model(session: Session, tenant: str, model_id: str) -> OnnxModel:
    row = session.get(OnnxModel, model_id)
    # Another tenant's model answers exactly like one that does not exist.
    if row is None or row.deleted_at is not None or row.tenant != tenant:
        raise NotFound(f"No model with id {model_id!r} exists.", detail={"model_id": model_id})
    return row


def list_models_query(tenant: str) -> Select[OnnxModel]:
    return select(OnnxModel).where(OnnxModel.tenant == tenant, OnnxModel.deleted_at.is_(None))


def delete_model(session: Session, storage: Storage, tenant: str, model_id: str) -> None:
    row = get_model(session, tenant, model_id)
    active = select(Job.id).where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES)).limit(1)
    used = session.scalar(active.where(Job.model_id == model_id))
    # Mode compare reads its float reference from the recipe: the job needs that model too.
    reference = session.scalar(active.where(Job.recipe["reference_model_id"].as_string() == model_id))
    if used is not None or reference is not None:
        role = "used by" if used is not None else "the float reference (recipe.reference_model_id) of"
        raise Conflict(
            f"The model is {role} a queued or running job; cancel the job or wait for it to finish, then delete.",
            detail={"model_id": model_id, "job_id": used or reference},
        )
    row.deleted_at = utcnow()
    session.flush()
    prefix = row.storage_prefix
    after_commit(session, lambda: storage.delete_prefix(prefix))
