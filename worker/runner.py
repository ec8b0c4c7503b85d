"""Runs one attempt of a job: claims it, runs the engine in a child process under limits, stores
the artifacts and records the outcome. The database stays the source of truth throughout.

Faults, and what the runner does about them (each a deliberate choice):
- A duplicated or late task message finds the job not `queued`: the claim fails and nothing runs.
- The database goes away mid-job: the job's process keeps going and the runner retries its writes.
  The lease may run out meanwhile; once the database is back, whichever writes first wins: this
  runner (the job goes on) or the sweep (the job is re-queued and this runner gives it up at its
  next write). Either way one attempt owns the job, because every write is conditional on it.
- A stop request (SIGTERM in the pool process: the worker is shutting down and its grace ran out,
  or Celery cancels the task because the broker connection was lost): the job's process is
  stopped and the job handed back to the queue (`state.release`), then re-sent.
- The worker is SIGKILLed: the job's process dies with it (PR_SET_PDEATHSIG), the lease runs out
  and the sweep re-queues the job; the next attempt clears what the killed one left on disk.
- Object storage is unreachable while the job's inputs are fetched or its results stored: the
  job is put back in line (`state.retry_later`, the attempt counted) and its message sent again
  after QAAS_STORAGE_RETRY_S, doubled for each such attempt; the last of QAAS_JOB_MAX_ATTEMPTS
  fails it with `storage_unavailable`. Nothing was recorded as succeeded: that happens only once
  the objects exist. An input missing from storage (deleted) fails the job with `input_missing`."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo, RuleError
from core.evaluation import EvaluationSettings, EvaluationSpec
from core.jobfile import OUTCOME_FILE, ChildOutcome, DatasetSource, JobFile
from core.lifecycle import AttemptStatus, overall_progress
from core.model import TensorSpec
from core.progress import CandidateProgress, Note, ProgressLine
from core.recipe import parse_recipe
from service import logs
from service.database import make_engine, make_session_factory, transaction
from service.errors import QuotaExceeded
from service.jobs import state
from service.quotas import charge, check_storage
from service.settings import Settings, get_settings
from service.storage import ObjectMissing, Storage, StorageUnavailable, open_storage
from service.tables import Artifact, Dataset, Job, OnnxModel
from worker.inputs import InputCache
from worker.sandbox import ArtifactRefused, accept_artifacts, child_env, exit_error, job_limits

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
EOF = b""  # the reader thread's last item; a real line always ends with a newline
CANCEL_POLL_S = 1.0
T = TypeVar("T")
CANCELLED = ErrorInfo.from_dict(state.CANCELLED_ERROR)
STORAGE_RETRY_MAX_S = 600.0
# Sends a job's message again, to run after a countdown in seconds (worker.tasks.enqueue).
Enqueue = Callable[[str, float], None]


class DatabaseUnavailable(Exception):
    """The job could not be claimed because the database is unreachable; the task retries later."""


class InputMissing(Exception):
    """An input of the job (its model, reference model or dataset) is gone: deleted, or missing from
    storage. No later attempt can bring it back, so the job fails with `input_missing`."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.error = ErrorInfo(
            "input_missing",
            f"The job's {what} is no longer stored (it was deleted), so the job cannot run; upload it "
            "again and start a new job.",
            {"input": what},
        )


def _die_with_runner() -> Callable[[], None] | None:
    """For Popen's preexec_fn (Linux): SIGKILL the job's process when this process dies, set
    between fork and exec so there is no window in which a killed worker leaves an orphan (the job
    process sets it again itself, but only after its imports). The pool process that runs this
    has no other threads at that moment, which is what makes preexec_fn safe here."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # died before the line above took effect
            os._exit(1)

    return preexec


def transient(exc: BaseException) -> bool:
    """A database error worth retrying: the server went away or restarts, or SQLite is busy."""
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def _candidate(note: Note | None) -> CandidateProgress | None:
    return None if note is None else note.candidate


def _stderr_tail(workdir: Path, size: int = 4000) -> str:
    """The last `size` bytes of the job process's stderr.log (read only when the attempt failed)."""
    try:
        with (workdir / "stderr.log").open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def _log_tail(workdir: Path, returncode: int, code: str, tail: str) -> None:
    """The stderr tail may hold paths and native traces: the worker's log, never the user's answer.
    Escaped onto one line: the job's own output must not be able to forge log lines."""
    log.warning(
        "job process in %s ended with %s (%s); stderr tail: %s",
        workdir,
        returncode,
        code,
        tail[-1500:].encode("unicode_escape").decode("ascii"),
    )


def _error(code: str, message: str, **detail: Any) -> ErrorInfo:
    return ErrorInfo(code, message, detail)


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
        self.enqueue = enqueue
        self.stop_requested = threading.Event()
        self.busy = False
        self._db_down_since: float | None = None

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
        self._db_down_since = None
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
            self._write_job_file(job_id, workdir)
            outcome = self._run_child(job_id, attempt, workdir)
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
                self._end(job_id, attempt, _error("internal", message), "failed")
        finally:
            self._remove_workdir(workdir)
        log.info("job %s: attempt %d finished", job_id, attempt)

    # -- scratch space and database writes that outlive an outage ------------------------------

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
        """`fn` in one transaction, retried for up to a lease while the database is unreachable.
        None when it never got through: the job then stays `running` until its lease runs out and
        the sweep takes it back, which is safe because nothing was recorded."""
        deadline = time.monotonic() + self.settings.job_lease_s
        delay = 0.2
        while True:
            try:
                with transaction(self.session_factory) as session:
                    return fn(session)
            except DBAPIError as exc:
                if not transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    log.error("could not %s: the database stayed unreachable (%s)", what, exc.orig)
                    return None
                log.warning("could not %s yet, the database is unreachable (%s); retrying", what, exc.orig)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _end(self, job_id: str, attempt: int, error: ErrorInfo, status: str) -> None:
        """Record failed/cancelled; a job that did not succeed keeps no stored files at all."""
        if self._write(
            f"record job {job_id} as {status}",
            lambda s: state.fail(s, job_id, attempt, error.to_dict(), status=status),
        ):
            self._forget(f"jobs/{job_id}")

    def _forget(self, prefix: str) -> None:
        """Delete stored files no row points at, if storage answers; else they stay until the job is
        deleted (or the retention sweep takes it), and the outcome recorded stands."""
        try:
            self.storage.delete_prefix(prefix)
        except OSError as exc:
            log.warning("could not delete the stored files under %s (%s); they stay", prefix, exc)

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
            self._end(job_id, attempt, _error("storage_unavailable", message, attempts=attempt), "failed")
            return
        if storing:
            self._forget(f"jobs/{job_id}/{attempt}")  # what it stored before storage broke off
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
            self._forget(f"jobs/{job_id}")
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

    def _write_job_file(self, job_id: str, workdir: Path) -> None:
        """The job's inputs are fetched into `workdir/inputs` (through this worker's cache) once the
        rows are read, and job.json points the job's process at them."""
        inputs = workdir / "inputs"
        # what it is (for messages), key, sha256, size, local copy, a file of its own
        fetches: list[tuple[str, str, str, int, Path, bool]] = []
        with transaction(self.session_factory) as session:
            job = session.get(Job, job_id)
            assert job is not None
            model = session.get(OnnxModel, job.model_id)
            if model is None or model.deleted_at is not None:
                raise InputMissing("model")

            def source(dataset_id: str | None) -> DatasetSource | None:
                if dataset_id is None:
                    return None
                row = session.get(Dataset, dataset_id)
                if row is None or row.deleted_at is not None:
                    raise InputMissing(f"dataset {dataset_id}")
                local = inputs / dataset_id / row.storage_key.rsplit("/", 1)[-1]
                fetches.append((f"dataset {dataset_id}", row.storage_key, row.sha256, row.size_bytes, local, False))
                return DatasetSource(local, row.format, row.preprocess)

            def model_files(row: OnnxModel, folder: Path, what: str) -> Path:
                """The model's file, its external data files beside it as they were uploaded."""
                external = [(e["name"], e["sha256"], e["size_bytes"]) for e in row.external_data or []]
                size = row.size_bytes - sum(s for _, _, s in external)
                for name, sha256, file_size in [(row.file_name, row.sha256, size), *external]:
                    key = f"{row.storage_prefix}/{name}"
                    fetches.append((f"{what} file {name!r}", key, sha256, file_size, folder / name, True))
                return folder / row.file_name

            asked = EvaluationSettings(**(job.evaluation or {}))
            reference_path = None
            reference_id = (job.recipe or {}).get("reference_model_id")
            if reference_id:  # mode compare
                reference = session.get(OnnxModel, reference_id)
                if reference is None or reference.deleted_at is not None:
                    raise InputMissing("reference model")
                reference_path = model_files(reference, inputs / "reference", "reference model")
            spec = JobFile(
                job_id=job.id,
                model_path=model_files(model, inputs / "model", "model"),
                inputs=tuple(TensorSpec.from_mapping(i) for i in model.inputs),
                recipe=parse_recipe(job.recipe),
                reference_model_path=reference_path,
                evaluation=EvaluationSpec.capped(
                    asked,
                    max_latency_runs=self.settings.max_latency_runs,
                    max_samples=self.settings.evaluation_max_samples,
                    max_seconds=self.settings.evaluation_max_seconds,
                ),
                calibration=source(job.calibration_dataset_id),
                evaluation_data=source(job.evaluation_dataset_id),
                reused_calibration=job.evaluation_dataset_id is not None
                and job.evaluation_dataset_id == job.calibration_dataset_id,
                limits=job_limits(
                    self.settings.job_memory_bytes,
                    self.settings.job_timeout_s,
                    self.settings.resolved_job_file_bytes,
                    self.settings.job_open_files,
                ),
            )
        for what, key, sha256, size, local, copy in fetches:
            if local.exists():  # the same dataset for calibration and evaluation
                continue
            try:
                self.inputs.fetch(key, sha256, size, local, copy=copy)
            except ObjectMissing as exc:
                raise InputMissing(what) from exc
        spec.write(workdir)

    def _run_child(self, job_id: str, attempt: int, workdir: Path) -> ChildOutcome:
        stderr = (workdir / "stderr.log").open("wb")
        child = subprocess.Popen(
            [sys.executable, "-m", "worker.job_process", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # its own process group, so a stop reaches its threads' children too
            env=child_env(workdir),
            preexec_fn=_die_with_runner(),
        )
        lines: queue.Queue[bytes] = queue.Queue()

        def read() -> None:
            for line in child.stdout or []:
                lines.put(line)
            lines.put(EOF)  # wakes the loop at once when the job process ends

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started = time.monotonic()
        last_write = last_cancel_check = 0.0
        pending: tuple[str, float] = ("validating", 0.0)
        pending_note: Note | None = None  # the engine's last note stands until its next one
        written_note: Note | None = None
        written: tuple[str, float] | None = None
        renew_s = self.settings.job_lease_s / 4
        shown = 0.0
        try:
            while True:
                try:
                    line = lines.get(timeout=0.2)
                    if line is EOF:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            child.wait(timeout=5)
                        if child.poll() is not None:
                            break
                        continue
                    message = ProgressLine.parse(line)
                    pending = (message.stage, message.fraction)
                    if message.note is not None:
                        pending_note = message.note
                except queue.Empty:
                    pass
                except (ValueError, KeyError, TypeError):
                    log.debug("job %s: unparsed child output %r", job_id, line[:200])
                now = time.monotonic()
                if self.stop_requested.is_set() and child.poll() is None:  # a finished job is kept
                    self._stop(child)
                    return ChildOutcome(AttemptStatus.HANDED_BACK)
                # Write progress when it moved (at most every PROGRESS_INTERVAL_S), and renew the lease.
                # A new candidate of mode auto is written at once: there are few, and each is worth showing.
                moved = (pending != written or pending_note != written_note) and (
                    now - last_write >= PROGRESS_INTERVAL_S or _candidate(pending_note) != _candidate(written_note)
                )
                if moved or now - last_write >= renew_s:
                    stage, fraction = pending
                    shown = max(shown, overall_progress(stage, fraction))  # never backwards
                    last_write = now
                    still_ours = self._unless_db_down(job_id, self._renew, job_id, attempt, stage, shown, pending_note)
                    if still_ours is not None:
                        written, written_note = pending, pending_note
                    if still_ours is False:
                        self._stop(child)
                        return ChildOutcome(AttemptStatus.ABANDONED)
                if now - last_cancel_check >= CANCEL_POLL_S:
                    last_cancel_check = now
                    if self._unless_db_down(job_id, self._cancel_requested, job_id):
                        self._stop(child)
                        return ChildOutcome(AttemptStatus.CANCELLED, error=CANCELLED)
                if now - started > self.settings.job_timeout_s:
                    self._stop(child)
                    limit = self.settings.job_timeout_s
                    return ChildOutcome(
                        AttemptStatus.FAILED,
                        error=_error(
                            "timeout",
                            f"The job ran longer than the limit of {limit} s and was stopped; use fewer "
                            "calibration samples or latency runs, or ask the operator to raise "
                            "QAAS_JOB_TIMEOUT_S.",
                            limit_s=limit,
                        ),
                    )
                if child.poll() is not None and lines.empty():
                    reader.join(timeout=5)
                    if not lines.empty():
                        continue
                    break
        finally:
            stderr.close()
            if child.poll() is None:
                self._stop(child)
            reader.join(timeout=5)
            if child.stdout is not None:
                child.stdout.close()
        return self._read_outcome(child.returncode, workdir)

    def _renew(self, job_id: str, attempt: int, stage: str, shown: float, note: Note | None = None) -> bool:
        with transaction(self.session_factory) as session:
            return state.progress(session, job_id, attempt, stage, shown, self.settings.job_lease_s, note)

    def _cancel_requested(self, job_id: str) -> bool:
        with self.session_factory() as session:
            return state.cancel_requested(session, job_id)

    def _unless_db_down(self, job_id: str, fn: Callable[..., T], *args: Any) -> T | None:
        """`fn(*args)`, or None while the database is unreachable: the job's process goes on meanwhile."""
        try:
            result = fn(*args)
        except DBAPIError as exc:
            if not transient(exc):
                raise
            if self._db_down_since is None:
                self._db_down_since = time.monotonic()
                log.warning("job %s: database unreachable (%s); the job goes on, writes are retried", job_id, exc.orig)
            return None
        if self._db_down_since is not None:
            log.warning("job %s: database back after %.1f s", job_id, time.monotonic() - self._db_down_since)
            self._db_down_since = None
        return result

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        except ProcessLookupError:
            pass

    def _read_outcome(self, returncode: int, workdir: Path) -> ChildOutcome:
        if returncode == 0 and (workdir / OUTCOME_FILE).exists():
            try:
                outcome = ChildOutcome.read(workdir)
            except ValueError as exc:  # pydantic's ValidationError included
                log.error("job process in %s wrote an outcome that does not read: %s", workdir, str(exc)[:500])
                message = "The job process returned an outcome the worker cannot read; the worker log has the details."
                return ChildOutcome(AttemptStatus.FAILED, error=_error("internal", message))
            if outcome.status == "failed" and (tail := _stderr_tail(workdir)):  # the engine's traceback
                _log_tail(workdir, returncode, outcome.error.code if outcome.error else "failed", tail)
            try:
                outcome = dataclasses.replace(outcome, artifacts=accept_artifacts(outcome.artifacts, workdir))
            except ArtifactRefused as exc:
                log.error("job process in %s handed back a refused artifact: %s", workdir, exc)
                message = "The job process returned files the worker does not accept; the worker's log has the details."
                return ChildOutcome(AttemptStatus.FAILED, error=_error("internal", message))
            return outcome
        tail = _stderr_tail(workdir)
        error = exit_error(returncode, tail, JobFile.read(workdir).limits)
        _log_tail(workdir, returncode, error.code, tail)
        return ChildOutcome(AttemptStatus.FAILED, error=error)

    def _store_success(self, job_id: str, attempt: int, outcome: ChildOutcome) -> None:
        """Files first (each written to a temporary name and renamed into place, under this attempt's
        own prefix), then the artifact rows and `succeeded` in one transaction: a job is never
        `succeeded` without its files, and a download never meets a partial one."""
        prefix = f"jobs/{job_id}/{attempt}"
        over_quota = self._write(f"check job {job_id}'s storage quota", lambda s: self._quota_error(s, job_id, outcome))
        if over_quota:
            self._end(job_id, attempt, over_quota, "failed")
            return
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
            self._end(job_id, attempt, CANCELLED, "cancelled")
        elif done == "lost":
            self._forget(prefix)
            log.warning("job %s: attempt %d lost ownership before it could finish", job_id, attempt)
        # None: the database never answered, so we cannot tell whether the commit landed. The files
        # stay (a success may point at them); the sweep re-queues the job if it did not land.

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
            self._forget(f"{prefix}{old}")
