"""The job state machine. Every transition is a conditional UPDATE (compare-and-set on status and
attempt), so a duplicated or late task message can neither run a job twice nor rewrite a finished one.

queued -> running -> succeeded | failed | cancelled;  queued -> cancelled;
running -> queued (lease expired: requeue_lost; handed back by its worker: release; put back after
an outage outside the job: retry_later).

`attempts` is the fencing token: a worker owns a job while the row is `running` with the attempt
number its claim returned, and every write it makes is conditional on that."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from core.errors import ErrorInfo
from core.lifecycle import JobStatus
from core.progress import NOTE_LENGTH, Note
from service.database import utcnow
from service.tables import Job

RUNNING = JobStatus.RUNNING.value
QUEUED = JobStatus.QUEUED.value
# A job's note says what it does while it runs: every transition out of (or into) running clears it.
NO_NOTE: dict[str, Any] = {"progress_note": None, "progress_detail": None}


def _changed(result: Any) -> bool:
    assert isinstance(result, CursorResult)
    return bool(result.rowcount == 1)


def claim(session: Session, job_id: str, lease_s: float) -> int | None:
    """queued -> running. Returns the attempt number now owned by the caller, or None."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.cancel_requested.is_(False))
        .values(
            status=RUNNING,
            stage="validating",
            progress=0.0,
            **NO_NOTE,
            attempts=Job.attempts + 1,
            started_at=now,
            updated_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            error=None,
        )
    )
    if not _changed(result):
        return None
    attempts: int = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
    return attempts


def _owned(job_id: str, attempt: int) -> Any:
    return (Job.id == job_id) & (Job.status == RUNNING) & (Job.attempts == attempt)


def progress(
    session: Session, job_id: str, attempt: int, stage: str, fraction: float, lease_s: float, note: Note | None = None
) -> bool:
    """Record progress and what the job does now (the engine's last note: its text and, in mode auto,
    the candidate it names, both columns from the one note) and renew the lease; False when the job is
    no longer this attempt's."""
    now = utcnow()
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt))
            .values(
                stage=stage,
                progress=max(0.0, min(1.0, fraction)),
                progress_note=None if note is None else note.text,
                progress_detail=None if note is None else note.detail(),
                updated_at=now,
                lease_expires_at=now + timedelta(seconds=lease_s),
            )
        )
    )


def succeed(session: Session, job_id: str, attempt: int, result: dict[str, Any]) -> bool:
    """running -> succeeded, unless a cancellation was asked for meanwhile: the user who asked gets
    `cancelled` (see `CANCELLED_ERROR`), never a job that went on to succeed after they cancelled it."""
    now = utcnow()
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt), Job.cancel_requested.is_(False))
            .values(
                status=JobStatus.SUCCEEDED.value,
                stage="done",
                progress=1.0,
                **NO_NOTE,
                result=result,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
            )
        )
    )


def fail(session: Session, job_id: str, attempt: int, error: dict[str, Any], *, status: str = "failed") -> bool:
    now = utcnow()
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt))
            .values(status=status, error=error, finished_at=now, updated_at=now, lease_expires_at=None, **NO_NOTE)
        )
    )


def release(session: Session, job_id: str, attempt: int) -> bool:
    """running -> queued, handed back by its own worker (shutting down, or told to stop by Celery).

    Deliberately un-counts the attempt: `job_max_attempts` bounds how often a job may *lose* its
    worker, and a worker that stops on purpose has not lost it, so deploys never push a job towards
    `worker_lost`. Reusing the number is safe because the releasing worker stops the job's process
    and writes nothing after this update. A job whose cancellation was asked for is not released
    (False): the caller ends it as cancelled."""
    return _back_in_line(session, job_id, attempt, **NO_NOTE, attempts=Job.attempts - 1, started_at=None)


def retry_later(session: Session, job_id: str, attempt: int, note: str) -> bool:
    """running -> queued, put back in line by its own worker after an outage outside the job (object
    storage unreachable). Unlike `release`, the attempt counts: `job_max_attempts` bounds how often
    that may happen. `note` says why the job waits (the one note a queued job carries); the next
    claim clears it. A job whose cancellation was asked for is not put back (False)."""
    return _back_in_line(session, job_id, attempt, progress_note=note[:NOTE_LENGTH], progress_detail=None)


def _back_in_line(session: Session, job_id: str, attempt: int, **values: Any) -> bool:
    """running -> queued by the attempt's own worker, unless cancellation was asked for (False). Its worker
    sends the job's message right after (`sent_at`)."""
    now = utcnow()
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt), Job.cancel_requested.is_(False))
            .values(
                status=QUEUED,
                stage="queued",
                progress=0.0,
                updated_at=now,
                sent_at=now,
                lease_expires_at=None,
                **values,
            )
        )
    )


CANCELLED_ERROR: dict[str, Any] = {
    "code": "cancelled",
    "message": "The job was cancelled at the user's request.",
    "detail": {},
}
CANCELLED = ErrorInfo.from_dict(CANCELLED_ERROR)  # the same, as the worker's outcomes carry it


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def request_cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is flagged and its worker stops it (or, if
    that worker is gone, the sweep ends it as cancelled). Two rounds, because a job may move
    between queued and running while we look."""
    for _ in range(2):
        now = utcnow()
        done = _changed(
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == QUEUED)
                .values(
                    status=JobStatus.CANCELLED.value,
                    cancel_requested=True,
                    error=CANCELLED_ERROR,
                    finished_at=now,
                    updated_at=now,
                )
            )
        ) or _changed(
            session.execute(
                update(Job).where(Job.id == job.id, Job.status == RUNNING).values(cancel_requested=True, updated_at=now)
            )
        )
        if done:
            break
    session.refresh(job)


def expired_running(session: Session) -> list[tuple[str, int]]:
    """(job id, attempt) of running jobs whose worker stopped renewing the lease."""
    rows = session.execute(
        select(Job.id, Job.attempts).where(Job.status == RUNNING, Job.lease_expires_at < utcnow())
    ).tuples()
    return list(rows.all())


def cancel_lost(session: Session, job_id: str, attempt: int) -> bool:
    """running (lease expired, cancellation asked for) -> cancelled: nobody is left to stop it."""
    now = utcnow()
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt), Job.lease_expires_at < now, Job.cancel_requested.is_(True))
            .values(
                status=JobStatus.CANCELLED.value,
                error=CANCELLED_ERROR,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
                **NO_NOTE,
            )
        )
    )


def requeue_lost(session: Session, job_id: str, attempt: int) -> bool:
    """running (lease expired) -> queued, for another attempt, its message sent right after (`sent_at`). Not a
    job the user cancelled: that would sit queued forever, since a claim never takes it (see `cancel_lost`)."""
    now = utcnow()
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt), Job.lease_expires_at < now, Job.cancel_requested.is_(False))
            .values(
                status=QUEUED,
                stage="queued",
                progress=0.0,
                updated_at=now,
                sent_at=now,
                lease_expires_at=None,
                **NO_NOTE,
            )
        )
    )


def fail_lost(session: Session, job_id: str, attempt: int, max_attempts: int) -> bool:
    now = utcnow()
    error = {
        "code": "worker_lost",
        "message": f"The worker running this job stopped responding {attempt} times (the maximum is "
        f"{max_attempts}); the job may be too heavy for the workers' memory. Try fewer calibration samples.",
        "detail": {"attempts": attempt},
    }
    return _changed(
        session.execute(
            update(Job)
            .where(_owned(job_id, attempt), Job.lease_expires_at < now)
            .values(
                status=JobStatus.FAILED.value,
                error=error,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
                **NO_NOTE,
            )
        )
    )


def _unheard_since(cutoff: datetime) -> Any:
    """Queued, and neither sent nor received by a worker since `cutoff`."""
    return (
        (Job.status == QUEUED)
        & (Job.sent_at.is_(None) | (Job.sent_at < cutoff))
        & (Job.received_at.is_(None) | (Job.received_at < cutoff))
    )


def stale_queued(session: Session, older_than_s: float) -> list[str]:
    """Queued jobs whose message was neither sent nor received by a worker for `older_than_s`: the broker
    may have lost it (the sweep asks the broker before it sends again)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(session.scalars(select(Job.id).where(_unheard_since(cutoff))))


def mark_sent(session: Session, job_ids: Sequence[str], older_than_s: float) -> list[str]:
    """Those of `job_ids` still unheard of for `older_than_s`, now marked sent: the caller sends them. A
    compare-and-set, so of several sweeps at once only one re-sends a job, and a job claimed or received
    meanwhile is left alone."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    marked: list[str] = []
    for start in range(0, len(job_ids), 500):
        chunk = list(job_ids[start : start + 500])
        query = update(Job).where(Job.id.in_(chunk), _unheard_since(cutoff)).values(sent_at=utcnow()).returning(Job.id)
        marked += session.scalars(query).all()
    return marked


def received(session: Session, job_ids: Collection[str]) -> None:
    """A worker received these jobs' messages (it may hold one until its countdown): not lost."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(list(job_ids)), Job.status == QUEUED).values(received_at=utcnow()))


def resend_due(session: Session, job_id: str, older_than_s: float) -> None:
    """A queued job whose message could not be sent: make it unheard of, so the next sweep sends it."""
    past = utcnow() - timedelta(seconds=older_than_s + 1)
    session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED).values(sent_at=past, received_at=None))


def unfinished(session: Session, job_ids: list[str]) -> set[str]:
    """Those of `job_ids` that are queued or running: a worker may still need their scratch files."""
    if not job_ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status.in_((QUEUED, RUNNING)))))


def running_attempts(session: Session, job_ids: list[str]) -> dict[str, int]:
    """The current attempt of those of `job_ids` that are running: older attempts can never own them again."""
    if not job_ids:
        return {}
    rows = session.execute(select(Job.id, Job.attempts).where(Job.id.in_(job_ids), Job.status == RUNNING))
    return {job_id: attempts for job_id, attempts in rows.tuples()}
