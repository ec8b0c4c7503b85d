"""A job's process, run to its end: its progress written, the lease renewed, stopped when it must be.

It is stopped when asked, cancelled, over its time or no longer the job's owner; then how it ended is
read from its exit code and its outcome file.

Faults, and what supervision does about them (each a deliberate choice):
- The database goes away mid-job: the job's process keeps going and its progress and lease are
  written again once the database answers (the writes that end the attempt are retried too,
  `worker/writes.py`). The lease may run out meanwhile; once the database is back, whichever writes
  first wins: this attempt (the job goes on) or the sweep (the job is re-queued and this attempt
  stops the job's process and gives it up, `abandoned`, at its next write). Either way one attempt
  owns the job, because every write is conditional on it.
- A stop request (`stop_requested`, set by the runner's owner): the job's process is stopped and
  the attempt answers `handed_back`, for the runner to hand the job back to the queue.
- The worker is SIGKILLed: the job's process dies with it (PR_SET_PDEATHSIG, `_start_job`); what it
  started in other sessions dies when the next job claims its uid (`worker/sandbox.py` `JobUser`).
- The job ends, however it ends: every process of its uid is killed before its outcome is read, so
  nothing of it runs on, and nothing changes its files while the worker reads them.
- The job's process dies, or answers what the worker does not accept: the attempt fails with the
  cause (`worker/sandbox.py` `exit_error`, `accept_artifacts`); its stderr tail goes to the log."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo
from core.jobfile import JOB_FILE, OUTCOME_FILE, ChildOutcome, JobFile
from core.lifecycle import AttemptStatus, overall_progress
from core.progress import CandidateProgress, Note, ProgressLine
from service.database import transaction
from service.jobs import state
from service.settings import Settings
from worker.sandbox import ArtifactRefused, JobUser, accept_artifacts, child_env, claim_job_user, exit_error
from worker.writes import transient

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
OUTCOME_MAX_BYTES = 256 << 20  # a result is a few MB at most; more is a job trying to exhaust the worker
EOF = b""  # the reader thread's last item; a real line always ends with a newline
CANCEL_POLL_S = 1.0
T = TypeVar("T")


def _start_job(user: JobUser | None) -> Callable[[], None] | None:
    """For Popen's preexec_fn (Linux): become the job's `user` (if any), then have the job's process
    SIGKILLed when this process dies, set between fork and exec so there is no window in which a killed
    worker leaves an orphan (the job process sets it again itself, but only after its imports; a change
    of uid clears it, hence after). The pool process that runs this has no other threads at that moment,
    which is what makes preexec_fn safe here."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        if user is not None:
            user.become()
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # died before the line above took effect
            os._exit(1)

    return preexec


def _candidate(note: Note | None) -> CandidateProgress | None:
    return None if note is None else note.candidate


def _stderr_tail(workdir: Path, size: int = 4000) -> str:
    """The last `size` bytes of the job process's stderr.log (read only when the attempt failed), if
    it is still the file the worker opened for it: the job owns its folder and may have put a link or a
    FIFO in its place."""
    try:
        fd = os.open(workdir / "stderr.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace").strip()


def _regular(path: Path, max_bytes: int) -> bool:
    """`path` is a regular file (not a link, a FIFO or a device the job put in the worker's way) of at
    most `max_bytes`. Checked once the job's processes are gone, so it stays so."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= max_bytes


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


class Supervisor:
    """Runs one attempt's job process to its end and says how it ended. `stop_requested` is the
    runner's: once set, the job's process is stopped and the attempt answers `handed_back`."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], stop_requested: threading.Event
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.stop_requested = stop_requested
        self._db_down_since: float | None = None

    def run(self, job_id: str, attempt: int, workdir: Path) -> ChildOutcome:
        """Starts `python -m worker.job_process workdir` (under a uid of the job's own when the worker can
        give it one) and watches it until it ends or is stopped."""
        user = claim_job_user(self.settings, workdir)
        try:
            returncode = self._watch(job_id, attempt, workdir, user)
        finally:
            if user is not None:
                user.release(workdir)  # every process of the job, whatever session it made for itself
        if isinstance(returncode, ChildOutcome):
            return returncode
        return read_outcome(returncode, workdir, None if user is None else user.uid)

    def _watch(self, job_id: str, attempt: int, workdir: Path, user: JobUser | None) -> int | ChildOutcome:
        """The job process's exit code, or how the attempt ended when it was stopped."""
        env = child_env(workdir)
        if user is not None:
            user.give(workdir)
        with (workdir / "stderr.log").open("wb") as stderr:  # the worker's file; the job writes through its copy
            child = subprocess.Popen(
                [sys.executable, "-m", "worker.job_process", str(workdir)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=workdir,
                start_new_session=True,  # its own process group, so a stop reaches its threads' children too
                env=env,
                preexec_fn=_start_job(user),
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
                    stop(child)
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
                        stop(child)
                        return ChildOutcome(AttemptStatus.ABANDONED)
                if now - last_cancel_check >= CANCEL_POLL_S:
                    last_cancel_check = now
                    if self._unless_db_down(job_id, self._cancel_requested, job_id):
                        stop(child)
                        return ChildOutcome(AttemptStatus.CANCELLED, error=state.CANCELLED)
                if now - started > self.settings.job_timeout_s:
                    stop(child)
                    limit = self.settings.job_timeout_s
                    return ChildOutcome(
                        AttemptStatus.FAILED,
                        error=ErrorInfo(
                            "timeout",
                            f"The job ran longer than the limit of {limit} s and was stopped; use fewer "
                            "calibration samples or latency runs, or ask the operator to raise "
                            "QAAS_JOB_TIMEOUT_S.",
                            {"limit_s": limit},
                        ),
                    )
                if child.poll() is not None and lines.empty():
                    if user is not None:
                        user.end()  # nothing of the job outlives its process, nor holds its stdout open
                    reader.join(timeout=5)
                    if not lines.empty():
                        continue
                    break
        finally:
            if child.poll() is None:
                stop(child)
            if user is not None:
                user.end()  # its other processes too (they may hold its stdout open)
            reader.join(timeout=5)
            if child.stdout is not None:
                child.stdout.close()
        return child.returncode

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


def stop(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the job's process group (an orderly exit), SIGKILL after 5 s."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    except ProcessLookupError:
        pass


def read_outcome(returncode: int, workdir: Path, owner: int | None = None) -> ChildOutcome:
    """How the job's process ended, from its exit code and the outcome it wrote, a success's artifacts
    checked (with `owner`, the job's uid: its own files only) and copied out of the job's reach."""
    if returncode == 0 and _regular(workdir / OUTCOME_FILE, OUTCOME_MAX_BYTES):
        try:
            outcome = ChildOutcome.read(workdir)
        except ValueError as exc:  # pydantic's ValidationError included
            log.error("job process in %s wrote an outcome that does not read: %s", workdir, str(exc)[:500])
            message = "The job process returned an outcome the worker cannot read; the worker log has the details."
            return ChildOutcome(AttemptStatus.FAILED, error=ErrorInfo("internal", message))
        if outcome.status == "failed" and (tail := _stderr_tail(workdir)):  # the engine's traceback
            _log_tail(workdir, returncode, outcome.error.code if outcome.error else "failed", tail)
        if outcome.status != AttemptStatus.SUCCEEDED:
            return dataclasses.replace(outcome, artifacts=())  # nothing of it is stored
        try:
            outcome = dataclasses.replace(outcome, artifacts=accept_artifacts(outcome.artifacts, workdir, owner))
        except ArtifactRefused as exc:
            log.error("job process in %s handed back a refused artifact: %s", workdir, exc)
            message = "The job process returned files the worker does not accept; the worker's log has the details."
            return ChildOutcome(AttemptStatus.FAILED, error=ErrorInfo("internal", message))
        return outcome
    tail = _stderr_tail(workdir)
    if not _regular(workdir / JOB_FILE, OUTCOME_MAX_BYTES):
        log.error("job process in %s ended with %s and replaced its job file", workdir, returncode)
        message = "The job process tampered with its job file; the worker's log has the details."
        return ChildOutcome(AttemptStatus.FAILED, error=ErrorInfo("internal", message))
    error = exit_error(returncode, tail, JobFile.read(workdir).limits)
    _log_tail(workdir, returncode, error.code, tail)
    return ChildOutcome(AttemptStatus.FAILED, error=error)
