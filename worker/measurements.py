"""A succeeded job whose target lists several classes or pools is measured again on a worker of each other
one, from its stored models (`python -m worker.measure_process`), into the job's `result.measured_on`
(service/jobs/measurements.py keeps what is pending).

The measurements of a succeeded job are asked for by the worker that ran it, right after (`ask_now`), and by
every worker's sweep when their message or their worker may have been lost (`ask_again`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo
from core.jobfile import MEASURED_FILE, MeasureFile
from core.result import MeasuredOn
from service.database import transaction
from service.jobs import measurements
from service.settings import Settings
from service.storage import ObjectMissing, StorageUnavailable
from service.tables import Artifact
from worker.inputs import InputCache
from worker.job_inputs import InputMissing, write_job_file
from worker.sandbox import child_env, claim_job_user, exit_error, job_limits

log = logging.getLogger(__name__)

# Scratch folders of measurements, under the work dir (the sweep's clean_scratch leaves it to `clean`).
MEASUREMENTS_DIR = "measurements"
QUANTIZED = ("quantized.onnx", "quantized.onnx.data")
MEASURED_MAX_BYTES = 4 << 20  # a MeasuredOn is a few KiB
Send = Callable[[measurements.Due], None]


class Measurer:
    """Measures succeeded jobs' models on this worker (one per Celery pool process, beside its runner, whose
    database and input cache it shares)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], inputs: InputCache) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.inputs = inputs

    def measure(self, job_id: str, target: str) -> None:
        """Measure the job's models on this worker for its `target` entry, if that is still pending."""
        with self.session_factory() as session:
            if not measurements.is_pending(session, job_id, target):
                log.info("job %s: no measurement pending on %s (done, or a duplicate message)", job_id, target)
                return
            stored = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        artifacts = {a.name: a for a in stored if a.name in QUANTIZED}
        workdir = self.settings.resolved_work_dir / MEASUREMENTS_DIR / f"{job_id}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        started = time.monotonic()
        try:
            measured = self._measured(job_id, target, workdir, artifacts)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if measured is None:
            return  # storage is away: the sweep asks again
        try:
            with transaction(self.session_factory) as session:
                recorded = measurements.record(session, job_id, measured)
        except DBAPIError as exc:  # the sweep asks again
            log.warning("job %s: measurement on %s not recorded (%s)", job_id, target, exc.orig)
            return
        log.info(
            "job %s: measured on %s (%s) in %.1f s%s",
            job_id,
            target,
            measured.status,
            time.monotonic() - started,
            "" if recorded else "; another worker's came first",
        )

    def _measured(self, job_id: str, target: str, workdir: Path, artifacts: dict[str, Artifact]) -> MeasuredOn | None:
        try:
            # The job's inputs, through this worker's cache, and its job file (which the child reads).
            write_job_file(self.session_factory, self.settings, self.inputs, job_id, workdir)
            folder = workdir / "artifact"
            for name, a in artifacts.items():  # mode compare stores none: its model is the quantized one
                # A file of its own: ONNX reads no external data through a file with several links.
                self.inputs.fetch(a.storage_key, a.sha256, a.size_bytes, folder / name, copy=True)
            MeasureFile(target, folder / QUANTIZED[0] if QUANTIZED[0] in artifacts else None).write(workdir)
        except InputMissing as exc:
            return MeasuredOn.failed(target, exc.error)
        except ObjectMissing:
            return MeasuredOn.failed(target, InputMissing("quantized model").error)
        except StorageUnavailable as exc:
            log.warning("job %s: object storage unreachable for its measurement on %s: %s", job_id, target, exc)
            return None
        return self._run_child(workdir, target)

    def _run_child(self, workdir: Path, target: str) -> MeasuredOn:
        """`python -m worker.measure_process` under a uid of its own when the worker can give it one, as a
        job's process runs (worker/sandbox.py); what it wrote is read without following its links."""
        limits = job_limits(
            self.settings.job_memory_bytes,
            self.settings.job_timeout_s,
            self.settings.resolved_job_file_bytes,
            self.settings.job_open_files,
        )
        user = claim_job_user(self.settings, workdir)
        try:
            env = child_env(workdir)
            if user is not None:
                user.give(workdir)
            # The worker's own file: the child writes through its copy of the descriptor, the tail is read
            # back through this one, whatever the child does to the name.
            with tempfile.TemporaryFile() as stderr:
                child = subprocess.Popen(
                    [sys.executable, "-m", "worker.measure_process", str(workdir)],
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    cwd=workdir,
                    start_new_session=True,
                    env=env,
                    # Its uid for good; it dies with this process once it runs (measure_process's first line).
                    preexec_fn=None if user is None else user.become,
                )
                try:
                    returncode = child.wait(timeout=self.settings.job_timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                    limit = self.settings.job_timeout_s
                    message = f"The measurement ran longer than the limit of {limit} s and was stopped."
                    return MeasuredOn.failed(target, ErrorInfo("timeout", message, {"limit_s": limit}))
                tail = _tail(stderr)
            measured = _read_measured(workdir, None if user is None else user.uid) if returncode == 0 else None
        finally:
            if user is not None:
                user.release(workdir)  # every process of its uid, however it left its process group
        if measured is not None:
            if measured.status == "failed" and tail:
                log.warning("measurement in %s failed; stderr tail: %s", workdir, _escaped(tail))
            return measured
        error = exit_error(returncode, tail, limits)
        if returncode == 0:  # it ended well, and left no measurement that reads
            message = "The measurement returned a result the worker cannot read; the worker log has the details."
            error = ErrorInfo("internal", message, {})
        log.warning(
            "measurement in %s ended with %s (%s); stderr tail: %s", workdir, returncode, error.code, _escaped(tail)
        )
        return MeasuredOn.failed(target, error)


def _read_measured(workdir: Path, owner: int | None) -> MeasuredOn | None:
    """The measurement the child wrote: a regular file of its own (with `owner`, the child's uid), opened
    without following a link and read to a bounded size; None when there is no such file or it does not read."""
    try:
        fd = os.open(workdir / MEASURED_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or (owner is not None and info.st_uid != owner):
            log.error("measurement in %s left %s that is not a file of its own", workdir, MEASURED_FILE)
            return None
        raw = f.read(MEASURED_MAX_BYTES + 1)
    try:
        if len(raw) > MEASURED_MAX_BYTES:
            raise ValueError(f"{MEASURED_FILE} is larger than {MEASURED_MAX_BYTES} bytes")
        return MeasuredOn.model_validate_json(raw)
    except ValueError as exc:  # pydantic's ValidationError included
        log.error("measurement in %s wrote a file that does not read: %s", workdir, str(exc)[:500])
        return None


def _tail(stderr: IO[bytes], size: int = 4000) -> str:
    stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - size))
    return stderr.read().decode(errors="replace").strip()


def _escaped(text: str) -> str:
    """The child's output on one log line: it must not be able to forge log lines."""
    return text[-1500:].encode("unicode_escape").decode("ascii")


def ask_now(factory: sessionmaker[Session], send: Send, job_id: str, settings: Settings) -> None:
    """After a job's attempt: send the measurements of the job never asked for yet (none unless it just
    succeeded with a target of several classes or pools)."""
    try:
        with transaction(factory) as session:
            due = measurements.ask(session, job_id, resend_after_s=None, max_requests=settings.job_max_attempts)
    except DBAPIError as exc:
        log.warning("job %s: could not look for measurements to ask for (%s); the sweep will", job_id, exc.orig)
        return
    _send_all(send, due)


def ask_again(factory: sessionmaker[Session], send: Send, settings: Settings) -> list[str]:
    """The sweep's part: measurements never asked for (their worker died right after the job), or asked
    for QAAS_QUEUED_RESEND_S ago and still pending. Returns `job/target` of each sent."""
    with factory() as session:
        waiting = measurements.jobs_waiting(session)
    sent = []
    for job_id in waiting:
        with transaction(factory) as session:
            due = measurements.ask(
                session, job_id, resend_after_s=settings.queued_resend_s, max_requests=settings.job_max_attempts
            )
        sent += [f"{d.job_id}/{d.target}" for d in _send_all(send, due)]
    return sent


def _send_all(send: Send, due: list[measurements.Due]) -> list[measurements.Due]:
    """A message the broker refuses is asked for again by a later sweep (QAAS_QUEUED_RESEND_S)."""
    sent = []
    for item in due:
        try:
            send(item)
            sent.append(item)
        except Exception as exc:
            log.warning(
                "could not ask for job %s's measurement on %s (%s); a sweep will", item.job_id, item.target, exc
            )
    return sent


def clean(folder: Path, older_than_s: float) -> list[str]:
    """Scratch folders of measurements that a killed worker left behind (none runs this long)."""
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for path in folder.iterdir():
        try:
            if path.lstat().st_mtime >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
        except OSError:
            continue
    return removed
