"""One attempt of a job: the claim, then its inputs, its process and its results, and how it ended.

The database stays the source of truth throughout.

Faults, and what the runner does about them (each a deliberate choice; the job's process and its
database outages are `worker/supervise.py`'s, storing a success is `worker/store.py`'s):
- A duplicated or late task message finds the job not `queued`: the claim fails and nothing runs.
- The database is unreachable at the claim: DatabaseUnavailable, and the task retries later. Later in
  the attempt, the writes that end it are retried for up to a lease (`worker/writes.py`); an
  unexpected database error that is the database being away hands the job back rather than fail it.
- A stop request (SIGTERM in the pool process: the worker is shutting down and its grace ran out,
  or Celery cancels the task because the broker connection was lost): the job's process is
  stopped and the job handed back to the queue (`state.release`), then re-sent.
- The worker is SIGKILLed: the job's process dies with it, the lease runs out and the sweep
  re-queues the job; the next attempt clears what the killed one left on disk.
- Object storage is unreachable while the job's inputs are fetched or its results stored: the
  job is put back in line (`state.retry_later`, the attempt counted) and its message sent again
  after QAAS_STORAGE_RETRY_S, doubled for each such attempt; the last of QAAS_JOB_MAX_ATTEMPTS
  fails it with `storage_unavailable`. Nothing was recorded as succeeded: that happens only once
  the objects exist. An input missing from storage (deleted) fails the job with `input_missing`."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo, RuleError
from core.jobfile import ChildOutcome
from service import logs
from service.database import make_engine, make_session_factory, transaction
from service.jobs import state
from service.settings import Settings, get_settings
from service.storage import Storage, StorageUnavailable, open_storage
from service.tables import Job
from worker.inputs import InputCache
from worker.job_inputs import InputMissing, write_job_file
from worker.preflight_timings import TimingsKeeper
from worker.store import ResultStore, forget
from worker.supervise import Supervisor
from worker.writes import transient, write

log = logging.getLogger(__name__)

T = TypeVar("T")
STORAGE_RETRY_MAX_S = 600.0
# Sends a job's message again, to run after a countdown in seconds (worker.tasks.enqueue).
Enqueue = Callable[[str, float], None]


class DatabaseUnavailable(Exception):
    """The job could not be claimed because the database is unreachable; the task retries later."""


class JobRunner:
    """Runs one job at a time (one runner per Celery pool process).

    `enqueue` sends a job's message again after a hand-back; `stop_requested` asks the attempt in
    progress to hand its job back (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: Storage,
        enqueue: Enqueue | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.storage = storage
        self.inputs = InputCache(storage, settings.cache_dir, settings.worker_cache_bytes)
        self.timings = TimingsKeeper(settings.preflight_cache_dir)
        self.results = ResultStore(settings, session_factory, storage)
        self.enqueue = enqueue
        self.stop_requested = threading.Event()
        self.busy = False

    @classmethod
    def from_settings(cls, settings: Settings | None = None, enqueue: Enqueue | None = None) -> JobRunner:
        settings = settings or get_settings()
        engine = make_engine(settings)
        return cls(settings, make_session_factory(engine), open_storage(settings), enqueue)

    def close(self) -> None:
        bind = self.session_factory.kw.get("bind")
        if bind is not None:
            bind.dispose()

    # -- the attempt ---------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        """One attempt of the job if it is queued; otherwise (a duplicated or late message, a
        cancelled job) nothing. Raises DatabaseUnavailable when the claim cannot reach the database."""
        self.busy = True
        self.stop_requested.clear()
        try:
            self._run(job_id)
        finally:
            self.busy = False

    def _run(self, job_id: str) -> None:
        try:
            with transaction(self.session_factory) as session:
                attempt = state.claim(session, job_id, self.settings.job_lease_s)
                origin = session.execute(select(Job.tenant, Job.request_id).where(Job.id == job_id)).one_or_none()
        except DBAPIError as exc:
            if transient(exc):
                raise DatabaseUnavailable(f"the database is unreachable ({exc.orig})") from exc
            raise
        if attempt is None:
            log.info("job %s is not queued (duplicate or late message, or cancelled); skipping", job_id)
            return
        tenant, request_id = origin if origin is not None else (None, None)
        # Every log line of this attempt names the job, the attempt, the tenant and the request that made it.
        with logs.bound(job_id=job_id, attempt=attempt, tenant=tenant, request_id=request_id):
            self._attempt(job_id, attempt)

    def _attempt(self, job_id: str, attempt: int) -> None:
        log.info("job %s: attempt %d started", job_id, attempt)
        workdir = self._workdir(job_id, attempt)
        outcome: ChildOutcome | None = None
        try:
            write_job_file(self.session_factory, self.settings, self.inputs, job_id, workdir, self.timings)
            outcome = Supervisor(self.settings, self.session_factory, self.stop_requested).run(job_id, attempt, workdir)
            if outcome.status == "succeeded":
                self._store_success(job_id, attempt, outcome)
            elif outcome.status == "handed_back":
                self._hand_back(job_id, attempt, workdir)
            elif outcome.status != "abandoned":
                assert outcome.error is not None
                self._end(job_id, attempt, outcome.error, outcome.status)
        except StorageUnavailable as exc:
            self._storage_down(job_id, attempt, workdir, exc, storing=outcome is not None)
        except RuleError as exc:  # a stored recipe a rule made since refuses
            self._end(job_id, attempt, exc.info, "failed")
        except InputMissing as exc:
            log.warning("job %s: attempt %d finds its %s gone", job_id, attempt, exc)
            self._end(job_id, attempt, exc.error, "failed")
        except Exception as exc:
            if isinstance(exc, DBAPIError) and transient(exc):
                # Not the job's fault: give it back rather than fail it.
                log.warning("job %s: attempt %d lost the database (%s)", job_id, attempt, exc)
                self._hand_back(job_id, attempt, workdir)
            else:
                log.exception("job %s: attempt %d broke", job_id, attempt)
                message = f"The job failed unexpectedly on the worker ({type(exc).__name__}); it was logged."
                self._end(job_id, attempt, ErrorInfo("internal", message), "failed")
        finally:
            self.timings.take_back(workdir)  # what the pre-flight measured, whatever the outcome
            self._remove_workdir(workdir)
        log.info("job %s: attempt %d finished", job_id, attempt)

    def _store_success(self, job_id: str, attempt: int, outcome: ChildOutcome) -> None:
        """Keep a succeeded attempt's results, or end the job as the store answers: failed (over its
        tenant's quota) or cancelled (asked while the results were stored)."""
        instead = self.results.store_success(job_id, attempt, outcome)
        if instead is not None:
            assert instead.error is not None
            self._end(job_id, attempt, instead.error, instead.status)

    # -- scratch space and the writes that end an attempt ---------------------------------------

    def _workdir(self, job_id: str, attempt: int) -> Path:
        """A fresh scratch folder for this attempt. Whatever earlier attempts of the job left on this
        host goes first (a SIGKILLed worker cleans nothing up): they can never own the job again."""
        parent = self.settings.resolved_work_dir / job_id
        for tries in range(3):
            if parent.is_dir():
                for old in parent.iterdir():
                    shutil.rmtree(old, ignore_errors=True)
            workdir = parent / str(attempt)
            try:
                workdir.mkdir(parents=True)
                return workdir
            except (FileNotFoundError, FileExistsError):  # raced with the cleanup of an earlier attempt
                if tries == 2:
                    raise
        raise AssertionError("unreachable")

    def _remove_workdir(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.parent.rmdir()  # the job's folder, once no attempt of it is left on this host

    def _write(self, what: str, fn: Callable[[Session], T]) -> T | None:
        return write(self.session_factory, self.settings.job_lease_s, what, fn)

    def _end(self, job_id: str, attempt: int, error: ErrorInfo, status: str) -> None:
        """Record failed/cancelled; a job that did not succeed keeps no stored files at all."""
        if self._write(
            f"record job {job_id} as {status}",
            lambda s: state.fail(s, job_id, attempt, error.to_dict(), status=status),
        ):
            forget(self.storage, f"jobs/{job_id}")

    def _hand_back(self, job_id: str, attempt: int, workdir: Path) -> None:
        """Return the job to the queue (or end it as cancelled, if that was asked) and re-send it."""
        if self._put_back(job_id, attempt, workdir, lambda s: state.release(s, job_id, attempt), 0.0):
            log.warning("job %s: attempt %d stopped on request and handed back to the queue", job_id, attempt)

    def _storage_down(self, job_id: str, attempt: int, workdir: Path, exc: OSError, *, storing: bool) -> None:
        """Object storage did not answer: put the job back in line to run again later, or, after
        QAAS_JOB_MAX_ATTEMPTS attempts, fail it with `storage_unavailable`. The store's own words
        (they name its endpoint) go to the log, not to the user."""
        most = self.settings.job_max_attempts
        what = "its results" if storing else "its inputs"
        log.warning("job %s: attempt %d could not reach object storage for %s: %s", job_id, attempt, what, exc)
        if attempt >= most:
            message = (
                f"Object storage could not be reached in {attempt} attempts (the maximum is {most}), so the job "
                f"could not {'store its results' if storing else 'read its inputs'}; start it again once "
                "storage is back, and tell the operator if this persists."
            )
            self._end(job_id, attempt, ErrorInfo("storage_unavailable", message, {"attempts": attempt}), "failed")
            return
        if storing:
            forget(self.storage, f"jobs/{job_id}/{attempt}")  # what it stored before storage broke off
        delay = min(STORAGE_RETRY_MAX_S, self.settings.storage_retry_s * 2 ** (attempt - 1))
        note = f"Waiting for object storage: attempt {attempt} of {most} could not reach it; next in {delay:g} s."
        if self._put_back(job_id, attempt, workdir, lambda s: state.retry_later(s, job_id, attempt, note), delay):
            log.warning("job %s: attempt %d put back in line; it runs again in %g s", job_id, attempt, delay)

    def _put_back(
        self, job_id: str, attempt: int, workdir: Path, requeue: Callable[[Session], bool], countdown: float
    ) -> bool:
        """Return the job to the queue with `requeue` (or end it as cancelled, if that was asked) and
        send its message again to run in `countdown` seconds. False when the job did not go back."""
        self._remove_workdir(workdir)  # first: the same attempt number may be claimed again at once

        def put_back(session: Session) -> str:
            if requeue(session):
                return "queued"
            if state.fail(session, job_id, attempt, state.CANCELLED_ERROR, status="cancelled"):
                return "cancelled"
            return "lost"

        done = self._write(f"put job {job_id} back in line", put_back)
        if done == "cancelled":
            forget(self.storage, f"jobs/{job_id}")
        if done != "queued":
            return False
        if self.enqueue is not None:
            try:
                self.enqueue(job_id, countdown)
            except Exception as exc:  # the broker is down: mark it for the next sweep to re-send
                log.warning("job %s: could not re-send its message (%s); the sweep will", job_id, exc)
                self._write(
                    f"mark job {job_id} for re-sending",
                    lambda s: state.resend_due(s, job_id, self.settings.queued_resend_s),
                )
        return True
