"""Measurements of a succeeded job on the other classes and pools its `target` lists (`result.measured_on`):
the entries made when it succeeds (where it ran, from its own result; one `pending` per other target), which
are due to be asked for, and each one recorded as it arrives. The job itself has already succeeded;
`Job.measurements_pending` stays true until no entry is `pending`.

Every change locks the job's row first (PostgreSQL: the row; SQLite: the database, as every write does), so
two measurements arriving at once, or a sweep and a worker asking at once, never overwrite each other. Only
`result.measured_on` is rewritten; the rest of the stored result stays byte for byte as the worker stored it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pydantic import TypeAdapter
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from core.errors import ErrorInfo
from core.lifecycle import JobStatus
from core.placement import parse_target
from core.recipe import unchecked_recipe
from core.result import JobResult, MeasuredOn
from service.database import utcnow
from service.tables import Job

SUCCEEDED = JobStatus.SUCCEEDED.value
_ENTRIES: TypeAdapter[list[MeasuredOn]] = TypeAdapter(list[MeasuredOn])


@dataclass(frozen=True)
class Due:
    """A measurement to ask for: of the job, on a worker of `target`, through `queue`."""

    job_id: str
    target: str
    queue: str


def jobs_waiting(session: Session) -> list[str]:
    """Succeeded jobs with a measurement still pending."""
    query = select(Job.id).where(Job.measurements_pending.is_(True), Job.status == SUCCEEDED)
    return list(session.scalars(query))


def is_pending(session: Session, job_id: str, target: str) -> bool:
    """Whether the job still waits for its measurement on `target` (else a duplicate message: skip it)."""
    row = session.execute(
        select(Job.result).where(Job.id == job_id, Job.status == SUCCEEDED, Job.measurements_pending.is_(True))
    ).scalar_one_or_none()
    return any(e.target == target and e.status == "pending" for e in _entries(row))


def ask(session: Session, job_id: str, *, resend_after_s: float | None, max_requests: int) -> list[Due]:
    """The job's pending measurements to send now, each counted: those never asked for and, with
    `resend_after_s`, those asked for longer ago (their message or their worker may be lost). One asked for
    `max_requests` times already fails instead: no worker of its target took it."""
    job = _locked(session, job_id)
    if job is None:
        return []
    names = parse_target(job.target)
    queues = dict(zip(names, job.queues or [], strict=False))
    now = utcnow()
    due: list[Due] = []
    entries = []
    for entry in _entries(job.result) or _first(job, names):
        asked = entry.requested_at
        stale = asked is None or (resend_after_s is not None and asked < now - timedelta(seconds=resend_after_s))
        if entry.status == "pending" and stale:
            queue = queues.get(entry.target)
            if entry.requests >= max_requests or queue is None:
                entry = MeasuredOn.failed(entry.target, _unmeasured(entry, max_requests))
            else:
                entry = entry.model_copy(update={"requests": entry.requests + 1, "requested_at": now})
                due.append(Due(job_id, entry.target, queue))
        entries.append(entry)
    _store(job, entries)
    return due


def record(session: Session, job_id: str, measured: MeasuredOn) -> bool:
    """Put a measurement in place of its pending entry; False when there is none (measured already, the job
    deleted or not succeeded), and nothing changes."""
    job = _locked(session, job_id)
    if job is None:
        return False
    entries = _entries(job.result)
    waiting = next((e for e in entries if e.target == measured.target and e.status == "pending"), None)
    if waiting is None:
        return False
    placed = measured.model_copy(update={"requests": waiting.requests, "requested_at": waiting.requested_at})
    _store(job, [placed if e is waiting else e for e in entries])
    return True


def _first(job: Job, names: tuple[str, ...]) -> list[MeasuredOn]:
    """The entries of a job that just succeeded: where it ran, from its own result, then one pending entry per
    other class or pool its target lists."""
    if len(names) < 2 or job.result is None:
        return []
    try:
        result = JobResult.from_stored(job.result)
    except ValueError:  # a result of another shape: nothing to measure against
        return []
    objective = str(unchecked_recipe(job.recipe).objective)
    ran = MeasuredOn.where_it_ran(names[0], result, objective=objective, at=job.finished_at)
    return [ran, *(MeasuredOn.pending(name) for name in names[1:])]


def _locked(session: Session, job_id: str) -> Job | None:
    """The job, its row locked for this transaction, if it succeeded and waits for a measurement."""
    bumped = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == SUCCEEDED, Job.measurements_pending.is_(True))
        .values(updated_at=utcnow())
    )
    if not isinstance(bumped, CursorResult) or bumped.rowcount != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def _entries(result: object) -> list[MeasuredOn]:
    stored = result.get("measured_on") if isinstance(result, dict) else None
    return _ENTRIES.validate_python(stored or [])


def _store(job: Job, entries: list[MeasuredOn]) -> None:
    assert job.result is not None
    job.result = {**job.result, "measured_on": _ENTRIES.dump_python(entries, mode="json")}
    job.measurements_pending = any(e.status == "pending" for e in entries)


def _unmeasured(entry: MeasuredOn, max_requests: int) -> ErrorInfo:
    return ErrorInfo(
        "timeout",
        f"No worker of {entry.target!r} measured the job though it was asked {entry.requests} times (at most "
        f"{max_requests}); start a worker of that class or pool and run the job again.",
        {"target": entry.target, "requests": entry.requests},
    )
