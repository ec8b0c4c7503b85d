"""A job's stored files: a success's artifacts, within quota, recorded with it; files no row points at gone.

Faults, and what storing does about them (each a deliberate choice):
- Nothing is recorded as succeeded until the objects exist: files first, then the rows and
  `succeeded` in one transaction. Storage that does not answer raises StorageUnavailable, for the
  runner to put the job back in line; what this attempt stored by then is deleted there.
- The commit's answer is lost (the database went away): the retried commit finds the job already
  succeeded by this attempt and takes it as done. When the database does not answer within a lease,
  the files stay (a success may point at them) and the sweep re-queues the job if it did not land.
- The job was taken from this attempt, or cancelled, before the success landed: its files go, and a
  cancellation ends the job `cancelled`.
- A killed attempt left partial files under its own prefix: the next success deletes them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo
from core.jobfile import ChildOutcome
from core.lifecycle import AttemptStatus
from service.errors import QuotaExceeded
from service.jobs import state
from service.quotas import charge, check_storage
from service.settings import Settings
from service.storage import Storage
from service.tables import Artifact, Job
from worker.writes import write

log = logging.getLogger(__name__)
T = TypeVar("T")


def forget(storage: Storage, prefix: str) -> None:
    """Delete stored files no row points at, if storage answers; else they stay until the job is
    deleted (or the retention sweep takes it), and the outcome recorded stands."""
    try:
        storage.delete_prefix(prefix)
    except OSError as exc:
        log.warning("could not delete the stored files under %s (%s); they stay", prefix, exc)


class ResultStore:
    """Stores succeeded attempts' results (one per runner)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], storage: Storage) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.storage = storage

    def store_success(self, job_id: str, attempt: int, outcome: ChildOutcome) -> ChildOutcome | None:
        """Files first (each written to a temporary name and renamed into place, under this attempt's
        own prefix), then the artifact rows and `succeeded` in one transaction: a job is never
        `succeeded` without its files, and a download never meets a partial one.

        None once that is done, or out of this attempt's hands; else how the attempt ends instead, for
        the runner to record: failed (`quota_exceeded`, nothing stored) or cancelled meanwhile."""
        prefix = f"jobs/{job_id}/{attempt}"
        over_quota = self._write(f"check job {job_id}'s storage quota", lambda s: self._quota_error(s, job_id, outcome))
        if over_quota:
            return ChildOutcome(AttemptStatus.FAILED, error=over_quota)
        stored = [
            (item, self.storage.put_file(f"{prefix}/{item.name}", Path(item.path), move=True))
            for item in outcome.artifacts
        ]

        def commit(session: Session) -> str:
            session.execute(delete(Artifact).where(Artifact.job_id == job_id))
            session.add_all(
                Artifact(
                    job_id=job_id,
                    name=item.name,
                    storage_key=obj.key,
                    size_bytes=obj.size_bytes,
                    sha256=obj.sha256,
                    media_type=item.media_type,
                )
                for item, obj in stored
            )
            assert outcome.result is not None
            if state.succeed(session, job_id, attempt, outcome.result.model_dump(mode="json")):
                return "succeeded"
            session.rollback()
            # Why not? An earlier try may have committed and lost only its answer, or a cancellation
            # came in, or the job was taken from this attempt.
            row = session.execute(
                select(Job.status, Job.attempts, Job.cancel_requested).where(Job.id == job_id)
            ).one_or_none()
            if row is None or row.attempts != attempt:
                return "lost"
            if row.status == "succeeded":
                return "succeeded"
            return "cancel" if row.status == "running" and row.cancel_requested else "lost"

        done = self._write(f"record job {job_id} as succeeded", commit)
        if done == "succeeded":
            self._delete_other_attempts(job_id, attempt)
        elif done == "cancel":
            return ChildOutcome(AttemptStatus.CANCELLED, error=state.CANCELLED)
        elif done == "lost":
            forget(self.storage, prefix)
            log.warning("job %s: attempt %d lost ownership before it could finish", job_id, attempt)
        # None: the database never answered, so we cannot tell whether the commit landed. The files
        # stay (a success may point at them); the sweep re-queues the job if it did not land.
        return None

    def _write(self, what: str, fn: Callable[[Session], T]) -> T | None:
        return write(self.session_factory, self.settings.job_lease_s, what, fn)

    def _quota_error(self, session: Session, job_id: str, outcome: ChildOutcome) -> ErrorInfo | None:
        """The job's `quota_exceeded` error when its artifacts do not fit its tenant's quota, else None."""
        paths = [Path(item.path) for item in outcome.artifacts]
        incoming = charge(sum(p.stat().st_size for p in paths), len(paths))
        tenant = session.scalar(select(Job.tenant).where(Job.id == job_id))
        try:
            check_storage(session, self.settings, tenant or "", incoming)
        except QuotaExceeded as exc:
            message = f"The job's results were not stored: {exc.message[0].lower()}{exc.message[1:]}"
            return ErrorInfo(exc.code, message, exc.detail)
        return None

    def _delete_other_attempts(self, job_id: str, attempt: int) -> None:
        """Partial files of attempts that were killed while storing theirs."""
        prefix = f"jobs/{job_id}/"
        try:
            stored = self.storage.keys(prefix)
        except OSError as exc:
            log.warning("could not list the stored files under %s (%s); earlier attempts' stay", prefix, exc)
            return
        for old in {key[len(prefix) :].split("/", 1)[0] for key in stored} - {str(attempt)}:
            forget(self.storage, f"{prefix}{old}")
