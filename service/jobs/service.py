"""Jobs: create (with the checks that need the model and datasets), read, cancel, artifacts."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import onnx
from sqlalchemy import CursorResult, Select, delete, exists, select, text
from sqlalchemy.orm import Session

from service.database import after_commit, utcnow
from service.datasets.service import get_dataset
from service.errors import Conflict, InvalidRecipe, NotFound
from service.inspection.compat import check_dataset_fits_model
from service.jobs import state
from service.jobs.schemas import JobCreate
from service.models.service import get_model
from service.quotas import check_active_jobs
from service.settings import Settings
from service.storage import Storage
from service.tables import ACTIVE_STATUSES, Artifact, Dataset, Job, OnnxModel

IDEMPOTENCY_WINDOW = timedelta(hours=24)
WEIGHT_ONLY_OPS = ("MatMul", "Gather")


def request_digest(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def take_turns_on_key(session: Session, tenant: str, key: str) -> None:
    """Requests carrying the same Idempotency-Key (a client retrying while its first request still
    runs) take turns until the first one's transaction ends, so the others find its job instead of
    each making their own. PostgreSQL: an advisory lock of the transaction; SQLite: its write lock."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        lock = text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))")
        session.execute(lock, {"k": f"{tenant}\n{key}"})
    elif dialect == "sqlite":
        session.execute(text("UPDATE jobs SET id = id WHERE 0"))


def find_idempotent(session: Session, tenant: str, key: str, digest: str) -> Job | None:
    job = session.scalar(
        select(Job)
        .where(Job.tenant == tenant, Job.idempotency_key == key, Job.created_at >= utcnow() - IDEMPOTENCY_WINDOW)
        .order_by(Job.created_at.desc())
        .limit(1)
    )
    if job is not None and job.request_sha256 != digest:
        raise Conflict(
            "This Idempotency-Key was used in the last 24 hours with a different request body; "
            "use a new key for a different job.",
            detail={"idempotency_key": key, "job_id": job.id},
        )
    return job


def create_job(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    body: JobCreate,
    idempotency_key: str | None,
    request_id: str | None = None,
) -> tuple[Job, bool]:
    """Returns (job, created). An existing job is returned for a repeated Idempotency-Key."""
    digest = request_digest(body)
    if idempotency_key:
        take_turns_on_key(session, tenant, idempotency_key)
        existing = find_idempotent(session, tenant, idempotency_key, digest)
        if existing is not None:
            return existing, False
    model = get_model(session, tenant, body.model_id)
    calibration = get_dataset(session, tenant, body.calibration_dataset_id) if body.calibration_dataset_id else None
    evaluation = get_dataset(session, tenant, body.evaluation_dataset_id) if body.evaluation_dataset_id else calibration
    check_recipe(storage, body, model, calibration)
    if calibration is not None:
        check_dataset_fits_model(
            calibration.format, calibration.tensors, model.inputs, body.recipe.calibration_batch_size
        )
    if evaluation is not None and evaluation is not calibration:
        check_dataset_fits_model(evaluation.format, evaluation.tensors, model.inputs, body.evaluation.batch_size)
    check_active_jobs(session, settings, tenant)
    job = Job(
        tenant=tenant,
        model_id=model.id,
        calibration_dataset_id=calibration.id if calibration else None,
        evaluation_dataset_id=evaluation.id if evaluation else None,
        recipe=body.recipe.model_dump(mode="json"),
        evaluation=body.evaluation.model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_sha256=digest,
        request_id=request_id,  # the worker's log lines for this job carry it
    )
    session.add(job)
    session.flush()
    return job, True


def check_recipe(storage: Storage, body: JobCreate, model: OnnxModel, calibration: Dataset | None) -> None:
    """Model-dependent recipe rules (the model-independent ones live on the Recipe schema)."""
    recipe = body.recipe
    if recipe.mode == "static" and calibration is None:
        raise InvalidRecipe(
            "Static quantization needs calibration data; upload a dataset and pass its id as "
            "`calibration_dataset_id`, or use mode `dynamic`.",
            detail={"field": "calibration_dataset_id"},
        )
    if recipe.mode == "auto" and calibration is None:
        raise InvalidRecipe(
            "Mode `auto` compares static and dynamic variants and needs calibration data; "
            "pass `calibration_dataset_id`.",
            detail={"field": "calibration_dataset_id"},
        )
    if recipe.mode == "weight_only" and not any(model.op_counts.get(op) for op in WEIGHT_ONLY_OPS):
        raise InvalidRecipe(
            "Weight-only quantization rewrites MatMul (and Gather) weights, and this model has none; "
            "use mode `static` or `dynamic`.",
            detail={"op_counts": model.op_counts},
        )
    if recipe.op_types_to_quantize is not None:
        present = [op for op in recipe.op_types_to_quantize if model.op_counts.get(op)]
        if not present:
            raise InvalidRecipe(
                "None of `op_types_to_quantize` occurs in the model, so nothing would be quantized; "
                f"the model's operators are {sorted(model.op_counts)}.",
                detail={
                    "op_types_to_quantize": recipe.op_types_to_quantize,
                    "model_ops": sorted(model.op_counts),
                },
            )
    if recipe.nodes_to_exclude:
        names = node_names(storage, model)
        unknown = [n for n in recipe.nodes_to_exclude if n not in names]
        if unknown:
            raise InvalidRecipe(
                f"`nodes_to_exclude` names nodes the model does not have: {unknown[:10]}; "
                "use node names as they appear in the model (Netron shows them).",
                detail={"unknown_nodes": unknown},
            )


def node_names(storage: Storage, model: OnnxModel) -> set[str]:
    proto = onnx.load(str(storage.local_path(f"{model.storage_prefix}/{model.file_name}")), load_external_data=False)
    names: set[str] = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            names.add(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return names


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    # Another tenant's job answers exactly like one that does not exist.
    if job is None or job.tenant != tenant:
        raise NotFound(f"No job with id {job_id!r} exists.", detail={"job_id": job_id})
    return job


def list_jobs_query(tenant: str, status: str | None, model_id: str | None) -> Select[Job]:
    query = select(Job).where(Job.tenant == tenant)
    if status:
        query = query.where(Job.status == status)
    if model_id:
        query = query.where(Job.model_id == model_id)
    return query


def cancel_job(session: Session, tenant: str, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    if job.status in ("succeeded", "failed", "cancelled"):
        raise Conflict(
            f"The job already ended with status {job.status!r}; only queued or running jobs can be cancelled.",
            detail={"job_id": job_id, "status": job.status},
        )
    state.request_cancel(session, job)
    return job


def get_artifact(session: Session, tenant: str, job_id: str, name: str) -> Artifact:
    job = get_job(session, tenant, job_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        raise NotFound(
            f"Job {job_id!r} has no artifact named {name!r}; list them at /v1/jobs/{job_id}/artifacts.",
            detail={"job_id": job_id, "name": name},
        )
    return artifact


def delete_job(session: Session, storage: Storage, tenant: str, job_id: str) -> None:
    """Remove an ended job, its artifact rows and (once committed) its stored files. A queued or
    running job is refused: its worker may still be writing them."""
    job = get_job(session, tenant, job_id)
    ended = Job.status.notin_(ACTIVE_STATUSES)
    session.execute(delete(Artifact).where(Artifact.job_id == job.id, exists().where(Job.id == job.id, ended)))
    gone = session.execute(delete(Job).where(Job.id == job.id, ended))
    if not isinstance(gone, CursorResult) or gone.rowcount != 1:
        raise Conflict(
            f"The job is {job.status}; cancel it first (POST /v1/jobs/{job_id}/cancel), then delete it.",
            detail={"job_id": job_id, "status": job.status},
        )
    session.expunge(job)
    after_commit(session, lambda: storage.delete_prefix(f"jobs/{job_id}"))


def delete_job_row(session: Session, job_id: str) -> None:
    job = session.get(Job, job_id)
    if job is not None:
        session.delete(job)
