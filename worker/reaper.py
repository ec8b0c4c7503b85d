"""Finds jobs whose worker vanished (expired lease) or whose message vanished (stale queued) and
puts them back in line; a job lost too often fails with `worker_lost`. Runs in every worker's
main process: once at start, then on a timer. Sweeps are idempotent, so several workers may run them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from service.database import transaction
from service.jobs import state
from service.settings import Settings

log = logging.getLogger(__name__)


def sweep(factory: sessionmaker[Session], send: Callable[[str], None], settings: Settings) -> dict[str, list[str]]:
    done: dict[str, list[str]] = {"requeued": [], "failed": [], "resent": []}
    with factory() as session:
        expired = state.expired_running(session)
    for job_id, attempt in expired:
        with transaction(factory) as session:
            if attempt >= settings.job_max_attempts:
                if state.fail_lost(session, job_id, attempt, settings.job_max_attempts):
                    done["failed"].append(job_id)
                continue
            requeued = state.requeue_lost(session, job_id, attempt)
        if requeued:
            done["requeued"].append(job_id)
            _send(send, job_id)
    with factory() as session:
        stale = state.stale_queued(session, settings.queued_resend_s)
    for job_id in stale:
        if _send(send, job_id):
            with transaction(factory) as session:
                state.touch(session, job_id)
            done["resent"].append(job_id)
    if any(done.values()):
        log.warning("sweep: %s", done)
    return done


def _send(send: Callable[[str], None], job_id: str) -> bool:
    try:
        send(job_id)
        return True
    except Exception as exc:  # broker down: the next sweep tries again
        log.warning("sweep could not enqueue job %s: %s", job_id, exc)
        return False


class Reaper:
    def __init__(self, factory: sessionmaker[Session], send: Callable[[str], None], settings: Settings) -> None:
        self.factory = factory
        self.send = send
        self.settings = settings
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qaas-reaper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                sweep(self.factory, self.send, self.settings)
            except Exception:
                log.exception("sweep failed; retrying in %.0f s", self.settings.sweep_interval_s)
            self.stopped.wait(self.settings.sweep_interval_s)
