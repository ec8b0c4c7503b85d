"""Finds jobs whose worker vanished (expired lease) or whose message vanished (stale queued) and
puts them back in line; a job lost too often fails with `worker_lost`. Runs in every worker's
main process: once at start, then on a timer. Sweeps are idempotent, so several workers may run them.

A queued job's message is sent again only when it is really gone: the job was neither sent (`sent_at`)
nor received by a worker (`received_at`, even one that holds it until a countdown) for
QAAS_QUEUED_RESEND_S, and the broker holds no message of it, neither waiting in a queue nor delivered
and unacknowledged (service/queued_messages.py), at two looks a moment apart (a worker that has just
taken a message claims its job in between). So a backlog that waits longer than that, for busy workers
or for a class nobody serves, keeps one message per job instead of gaining one each interval, each of
them a failed claim later; and a message a Redis restart lost is sent again. Marking the job sent is a
compare-and-set before the send, so of several workers' sweeps one re-sends it. A worker whose broker
connection comes back asks at once (`Reaper.resend_all_soon`: every queued job the broker no longer
holds), so a Redis restarted without persistence delays nothing by QAAS_QUEUED_RESEND_S. A duplicate
that still slips through costs one failed claim.

Also asks again for the measurements of succeeded jobs on other worker classes that may have been lost
(worker/measurements.py), and clears what killed attempts left behind: their stored files and, on this
host, their scratch folders (measurements' included)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service import retention
from service.database import transaction
from service.jobs import state
from service.queued_messages import QueuedMessages
from service.settings import Settings
from service.storage import Storage
from worker import measurements

log = logging.getLogger(__name__)
# A worker that took a job's message from the broker claims the job within milliseconds: a message missing
# at two looks this far apart, its job still queued and unclaimed, is lost.
CONFIRM_S = 1.0


def sweep(
    factory: sessionmaker[Session],
    send: Callable[[str], None],
    settings: Settings,
    storage: Storage | None = None,
    *,
    resend_all: bool = False,
    send_measurement: measurements.Send | None = None,
    broker: QueuedMessages | None = None,
    confirm_s: float = CONFIRM_S,
) -> dict[str, list[str]]:
    """One sweep. `broker` tells which jobs have a message in the broker (default: one made for this sweep); a
    job is re-sent when it holds none at two looks `confirm_s` apart."""
    done: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "resent": [], "unsent": []}
    with factory() as session:
        expired = state.expired_running(session)
    for job_id, attempt in expired:
        with transaction(factory) as session:
            if state.cancel_lost(session, job_id, attempt):
                outcome = "cancelled"
            elif attempt >= (most := settings.job_max_attempts):
                outcome = "failed" if state.fail_lost(session, job_id, attempt, most) else ""
            else:
                outcome = "requeued" if state.requeue_lost(session, job_id, attempt) else ""
        if not outcome:
            continue
        done[outcome].append(job_id)
        if storage is not None:
            # A worker killed while storing leaves a partial set; only a success keeps files.
            _delete(storage, f"jobs/{job_id}/{attempt}" if outcome == "requeued" else f"jobs/{job_id}")
        if outcome == "requeued" and not _send(send, job_id):
            _resend_due(factory, job_id, settings)
            done["unsent"].append(job_id)
    unheard_s = 0 if resend_all else settings.queued_resend_s
    _resend_lost(factory, send, settings, broker, unheard_s, confirm_s, done)
    if send_measurement is not None:  # succeeded jobs still waiting for a measurement on another class
        done["measurements"] = measurements.ask_again(factory, send_measurement, settings)
    if any(done.values()):
        log.warning("sweep: %s", done)
    clean_scratch(factory, settings.resolved_work_dir)
    measurements.clean(settings.resolved_work_dir / measurements.MEASUREMENTS_DIR, 2 * settings.job_timeout_s + 600)
    return done


def _resend_lost(
    factory: sessionmaker[Session],
    send: Callable[[str], None],
    settings: Settings,
    broker: QueuedMessages | None,
    older_than_s: float,
    confirm_s: float,
    done: dict[str, list[str]],
) -> None:
    """Send again the message of every queued job unheard of for `older_than_s` that the broker no longer holds,
    at two looks `confirm_s` apart: a worker that has just taken a message claims its job within that moment."""
    with factory() as session:
        unheard = state.stale_queued(session, older_than_s)
    if not unheard:
        return
    own = broker is None
    broker = broker or QueuedMessages(settings)
    try:
        lost = _not_held(broker, unheard)
        if lost and confirm_s > 0:
            time.sleep(confirm_s)
            lost = _not_held(broker, lost)
    except Exception as exc:  # the broker does not answer: a send would fail too; the next sweep asks again
        log.warning("sweep could not read the broker's queues: %s", exc)
        done["unsent"] += unheard
        return
    finally:
        if own:
            broker.close()
    if not lost:
        return
    with transaction(factory) as session:
        mine = state.mark_sent(session, lost, older_than_s)  # not claimed or received meanwhile
    for job_id in mine:
        if _send(send, job_id):
            done["resent"].append(job_id)
        else:
            _resend_due(factory, job_id, settings)
            done["unsent"].append(job_id)


def _not_held(broker: QueuedMessages, job_ids: list[str]) -> list[str]:
    """Those of `job_ids` the broker holds no message of (all of them when it cannot tell: neither Redis nor
    the filesystem transport)."""
    held = broker.by_job()
    return [job_id for job_id in job_ids if held is None or job_id not in held]


def _resend_due(factory: sessionmaker[Session], job_id: str, settings: Settings) -> None:
    try:
        with transaction(factory) as session:
            state.resend_due(session, job_id, settings.queued_resend_s)
    except Exception as exc:  # the database is away too: the job is re-sent one interval later
        log.warning("sweep could not mark job %s for re-sending: %s", job_id, exc)


def clean_scratch(factory: sessionmaker[Session], work_dir: Path) -> list[str]:
    """Remove this host's scratch of jobs that ended or no longer exist, and every temporary file in
    it (a job's TMPDIR is inside its attempt's folder). A SIGKILLed worker leaves its attempt's folder
    behind, and the next attempt (which clears it) may run elsewhere. Folders of queued jobs, and the
    current attempt's folder of a running job, stay: a worker may be using them. Returns what went."""
    if not work_dir.is_dir():
        return []
    removed: list[str] = []
    for loose in [p for p in work_dir.iterdir() if p.is_symlink() or not p.is_dir()]:
        _remove(loose)  # nothing the runner writes lives here
        removed.append(loose.name)
    names = [p.name for p in work_dir.iterdir() if p.is_dir() and p.name != measurements.MEASUREMENTS_DIR]
    if not names:
        return removed
    with factory() as session:
        keep = state.unfinished(session, names)
        running = state.running_attempts(session, names)
    for name in names:
        if name not in keep:
            _remove(work_dir / name)
            removed.append(name)
        elif name in running:
            for old in (work_dir / name).iterdir():
                if not (old.name.isdigit() and int(old.name) >= running[name]):
                    _remove(old)
                    removed.append(f"{name}/{old.name}")
    return removed


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _delete(storage: Storage, prefix: str) -> None:
    """Best effort: with object storage down the job still goes back in line (its next success
    removes the other attempts' files; deleting an ended job removes all of them)."""
    try:
        storage.delete_prefix(prefix)
    except OSError as exc:
        log.warning("sweep could not delete the stored files under %s: %s", prefix, exc)


def _send(send: Callable[[str], None], job_id: str) -> bool:
    try:
        send(job_id)
        return True
    except Exception as exc:  # broker down: the next sweep tries again
        log.warning("sweep could not enqueue job %s: %s", job_id, exc)
        return False


class Receipts:
    """Jobs whose message reached this worker (Celery's task_received, in the main process, also for a message
    it holds until a countdown), written as `received_at` by a thread of their own, one UPDATE a second: the
    consumer never waits for the database."""

    def __init__(self, factory: sessionmaker[Session], interval_s: float = 1.0) -> None:
        self.factory = factory
        self.interval_s = interval_s
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qaas-receipts", daemon=True)

    def add(self, job_id: str) -> None:
        with self.lock:
            self.pending.add(job_id)

    def flush(self) -> None:
        with self.lock:
            job_ids, self.pending = self.pending, set()
        if not job_ids:
            return
        try:
            with transaction(self.factory) as session:
                state.received(session, job_ids)
        except Exception as exc:  # the database is away: kept for the next flush
            log.warning("could not record that %d job messages were received: %s", len(job_ids), exc)
            with self.lock:
                self.pending |= job_ids

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.flush()
        self.flush()


class Reaper:
    """The sweep, the expired uploads' sweep (and, with QAAS_RETENTION_DAYS, the retention sweep) on a timer."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        send: Callable[[str], None],
        settings: Settings,
        storage: Storage | None = None,
        send_measurement: measurements.Send | None = None,
    ) -> None:
        self.factory = factory
        self.send = send
        self.settings = settings
        self.storage = storage
        self.send_measurement = send_measurement
        self.broker = QueuedMessages(settings)  # connects at the first sweep that needs it
        self.receipts = Receipts(factory)
        self.stopped = threading.Event()
        self.wake = threading.Event()
        self.resend_all = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qaas-reaper", daemon=True)

    def start(self) -> None:
        self.receipts.start()
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        self.receipts.stop()

    def received(self, job_id: str) -> None:
        """A message of this job reached this worker (worker/tasks.py, on Celery's task_received)."""
        self.receipts.add(job_id)

    def resend_all_soon(self) -> None:
        """Sweep now and re-send every queued job: the broker may have lost their messages."""
        self.resend_all.set()
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            resend_all = self.resend_all.is_set()
            self.resend_all.clear()
            try:
                done = sweep(
                    self.factory,
                    self.send,
                    self.settings,
                    self.storage,
                    resend_all=resend_all,
                    send_measurement=self.send_measurement,
                    broker=self.broker,
                )
                if resend_all and done["unsent"]:
                    self.resend_all.set()  # the broker is not back after all: again next time
            except Exception as exc:
                if resend_all:
                    self.resend_all.set()  # not done: the next sweep tries again
                if isinstance(exc, DBAPIError):  # the database is away: one line, not a traceback
                    log.warning("sweep failed (%s); retrying in %.0f s", exc.orig, self.settings.sweep_interval_s)
                else:
                    log.exception("sweep failed; retrying in %.0f s", self.settings.sweep_interval_s)
            self._retention()
            self.wake.wait(self.settings.sweep_interval_s)
            self.wake.clear()
        self.broker.close()

    def _retention(self) -> None:
        if self.storage is None:
            return
        try:
            retention.sweep_uploads(self.factory, self.storage)
            if self.settings.retention_days is not None:
                retention.sweep(self.factory, self.storage, self.settings.retention_days)
        except Exception:
            log.exception("retention sweep failed; retrying in %.0f s", self.settings.sweep_interval_s)
