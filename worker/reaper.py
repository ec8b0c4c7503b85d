"""Finds jobs whose worker vanished (expired lease) or whose message vanished (stale queued) and
puts them back in line; a job lost too often fails with `worker_lost`. Runs in every worker's
main process: once at start, then on a timer. Sweeps are idempotent, so several workers may run them.

Re-sending a stale queued job is deliberate even when its message may still be in the broker: a
duplicate costs one failed claim, a lost message (a Redis restarted without persistence) would
cost the job. For the same reason a worker whose broker connection comes back re-sends every
queued job at once (`Reaper.resend_all_soon`), so a restarted Redis delays nothing by
QAAS_QUEUED_RESEND_S; with several workers each does, and the extra messages are skipped.

Also clears what killed attempts left behind: their stored files and, on this host, their
scratch folders."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service import retention
from service.database import transaction
from service.jobs import state
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger(__name__)


def sweep(
    factory: sessionmaker[Session],
    send: Callable[[str], None],
    settings: Settings,
    storage: Storage | None = None,
    *,
    resend_all: bool = False,
) -> dict[str, list[str]]:
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
            done["unsent"].append(job_id)
    with factory() as session:
        stale = state.stale_queued(session, 0 if resend_all else settings.queued_resend_s)
    for job_id in stale:
        if _send(send, job_id):
            with transaction(factory) as session:
                state.touch(session, job_id)
            done["resent"].append(job_id)
        else:
            done["unsent"].append(job_id)
    if any(done.values()):
        log.warning("sweep: %s", done)
    clean_scratch(factory, settings.resolved_work_dir)
    return done


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
    names = [p.name for p in work_dir.iterdir() if p.is_dir()]
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


class Reaper:
    """The sweep, the expired uploads' sweep (and, with QAAS_RETENTION_DAYS, the retention sweep) on a timer."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        send: Callable[[str], None],
        settings: Settings,
        storage: Storage | None = None,
    ) -> None:
        self.factory = factory
        self.send = send
        self.settings = settings
        self.storage = storage
        self.stopped = threading.Event()
        self.wake = threading.Event()
        self.resend_all = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qaas-reaper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    def resend_all_soon(self) -> None:
        """Sweep now and re-send every queued job: the broker may have lost their messages."""
        self.resend_all.set()
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            resend_all = self.resend_all.is_set()
            self.resend_all.clear()
            try:
                done = sweep(self.factory, self.send, self.settings, self.storage, resend_all=resend_all)
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

    def _retention(self) -> None:
        if self.storage is None:
            return
        try:
            retention.sweep_uploads(self.factory, self.storage)
            if self.settings.retention_days is not None:
                retention.sweep(self.factory, self.storage, self.settings.retention_days)
        except Exception:
            log.exception("retention sweep failed; retrying in %.0f s", self.settings.sweep_interval_s)
