"""Jobs: submit (the shared rules, then commit and send), read, cancel, artifacts."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import CursorResult, Select, delete, exists, select, text
from sqlalchemy.orm import Session

from core.datasets import DatasetPlan, plan_dataset
from core.lifecycle import ACTIVE_STATUSES, TERMINAL_STATUSES
from core.model import ModelFacts
from core.placement import ANY
from core.recipe import RecipeError, check_recipe_for_model, check_reference_fits
from service.database import after_commit, utcnow
from service.datasets.service import get_dataset
from service.errors import Conflict, NotFound, Unavailable
from service.jobs import state
from service.jobs.schemas import JobCreate
from service.models.service import get_model, stored_facts
from service.queue import JobQueue
from service.quotas import check_active_jobs, check_job_storage
from service.settings import Settings
from service.storage import Storage
from service.tables import Artifact, Dataset, Job, OnnxModel
from service.targets.service import first_queue, route

log = logging.getLogger(__name__)
IDEMPOTENCY_WINDOW = timedelta(hours=24)


def request_digest(body: JobCreate) -> str:
    data = body.model_dump(mode="json")
    if body.target == ANY:  # as before targets existed: a retry across the upgrade finds its job
        del data["target"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


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


def submit_job(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    settings: Settings,
    tenant: str,
    body: JobCreate,
    idempotency_key: str | None,
    request_id: str | None = None,
) -> Job:
    """Create the job (or find the one this Idempotency-Key made), commit, then send its message.
    A job is never left created but not sent: when the broker refuses, the job is deleted again
    and the client is told to retry (503). `request_id` (X-Request-ID) follows the job into the
    worker's log lines."""
    job, created = create_job(session, storage, settings, tenant, body, idempotency_key, request_id)
    session.commit()
    if created:
        try:
            queue.enqueue(job.id, queue=first_queue(job.queues))
        except Exception as exc:
            log.warning("broker unavailable, job %s withdrawn: %s", job.id, exc)
            delete_job_row(session, job.id)
            session.commit()
            raise Unavailable(
                "The job queue is unreachable, so no job was created; retry in a few seconds.",
                detail={"reason": type(exc).__name__},
            ) from exc
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
    """Returns (job, created). An existing job is returned for a repeated Idempotency-Key. Every
    rule the engine would apply to the recipe and the datasets runs here first, from the facts
    stored at upload, so a job that is accepted cannot fail on them later."""
    digest = request_digest(body)
    if idempotency_key:
        take_turns_on_key(session, tenant, idempotency_key)
        existing = find_idempotent(session, tenant, idempotency_key, digest)
        if existing is not None:
            return existing, False
    model = get_model(session, tenant, body.model_id)
    if body.recipe.reference_model_id is not None:
        with _as_the_request_names_it():
            check_reference(session, storage, tenant, body.recipe.reference_model_id, model)
    calibration = get_dataset(session, tenant, body.calibration_dataset_id) if body.calibration_dataset_id else None
    evaluation = get_dataset(session, tenant, body.evaluation_dataset_id) if body.evaluation_dataset_id else calibration
    facts = stored_facts(model, storage)
    with _as_the_request_names_it():
        check_recipe_for_model(body.recipe, facts, has_calibration=calibration is not None)
    if calibration is not None:
        plan_stored_dataset(calibration, facts, body.recipe.calibration_batch_size)
    if evaluation is not None:
        plan_stored_dataset(evaluation, facts, body.evaluation.batch_size)
    routing = route(session, settings, body.target_names)
    check_active_jobs(session, settings, tenant)
    check_job_storage(session, settings, tenant, model.size_bytes)
    job = Job(
        tenant=tenant,
        model_id=model.id,
        calibration_dataset_id=calibration.id if calibration else None,
        evaluation_dataset_id=evaluation.id if evaluation else None,
        recipe=body.recipe.to_dict(),
        evaluation=dataclasses.asdict(body.evaluation),
        idempotency_key=idempotency_key,
        request_sha256=digest,
        request_id=request_id,  # the worker's log lines for this job carry it
        target=None if body.target == ANY else body.target,
        queues=routing.queues,
        measurements_pending=routing.measures_elsewhere,
    )
    session.add(job)
    session.flush()
    return job, True


def plan_stored_dataset(dataset: Dataset, facts: ModelFacts, batch_size: int) -> DatasetPlan:
    """The shared fit rules, on the shapes recorded at upload (raises dataset_model_mismatch)."""
    return plan_dataset(
        dataset.format,
        dataset.tensors,
        facts.inputs,
        batch_size,
        num_samples=dataset.num_samples,
        has_labels=dataset.has_labels,
        preprocess=dataset.preprocess,
    )


@contextlib.contextmanager
def _as_the_request_names_it() -> Iterator[None]:
    """A broken recipe rule names its field as the request body does (`recipe.nodes_to_exclude`), like
    the request's own validation, whether the rule is the recipe's alone or needs the model's facts."""
    try:
        yield
    except RecipeError as exc:
        field = exc.detail.get("field")
        detail = {k: v for k, v in exc.detail.items() if k != "field"}
        raise RecipeError(exc.message, f"recipe.{field}" if field else "recipe", **detail) from exc


def check_reference(session: Session, storage: Storage, tenant: str, reference_id: str, model: OnnxModel) -> None:
    """Mode compare: the float reference must be another model of the tenant's, and fit the model."""
    try:
        reference = get_model(session, tenant, reference_id)
    except NotFound as exc:
        raise RecipeError(
            f"recipe.reference_model_id {reference_id!r} names no model of yours; upload the float model "
            "first and pass its id.",
            "reference_model_id",
            reference_model_id=reference_id,
        ) from exc
    if reference.id == model.id:
        raise RecipeError(
            "recipe.reference_model_id is the model itself; pass the float model the quantized one came from.",
            "reference_model_id",
        )
    check_reference_fits(stored_facts(model, storage), stored_facts(reference, storage))


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    # Another tenant's job answers exactly like one that does not exist.
    if job is None or job.tenant != tenant:
        raise no_such_job(job_id)
    return job


def no_such_job(job_id: str) -> NotFound:
    return NotFound(f"No job with id {job_id!r} exists.", detail={"job_id": job_id})


def list_jobs_query(tenant: str, status: str | None, model_id: str | None) -> Select[Job]:
    query = select(Job).where(Job.tenant == tenant)
    if status:
        query = query.where(Job.status == status)
    if model_id:
        query = query.where(Job.model_id == model_id)
    return query


def cancel_job(session: Session, tenant: str, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    if job.status in TERMINAL_STATUSES:
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
