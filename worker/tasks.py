"""Celery tasks: thin wrappers that pass a job id to the runner, and the worker's signal wiring
(the sweep and the heartbeat in the main process, the runner and its stop handler in each pool process)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from celery import Task, bootsteps
from celery.signals import (
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from service.database import make_engine, make_session_factory
from service.jobs.measurements import Due
from service.queue import MEASURE_TASK, RUN_JOB_TASK, JobQueue
from service.settings import get_settings
from service.storage import open_storage
from service.targets.service import queue_of
from worker.celery_app import app
from worker.measurements import Measurer, ask_now
from worker.presence import Heartbeat, this_worker
from worker.reaper import Reaper
from worker.runner import DatabaseUnavailable, JobRunner

log = logging.getLogger(__name__)
_runner: JobRunner | None = None
_runner_lock = threading.Lock()
_reaper: Reaper | None = None
_heartbeat: Heartbeat | None = None
_consumer: Any = None  # the main process's Celery consumer, once connected (see ResendOnReconnect)
CLAIM_RETRIES = 8  # then the sweep re-sends the job once it has been queued for QAAS_QUEUED_RESEND_S


def enqueue(job_id: str, countdown: float = 0.0) -> None:
    """Send a job's message again (a hand-back, a retry, the sweep) to the queue of its target."""
    # This process's own sessions: a pool process's runner's, or the main process's sweep's.
    factory = _reaper.factory if _runner is None and _reaper is not None else runner().session_factory
    with factory() as session:
        queue = queue_of(session, job_id)
    JobQueue(get_settings(), app).enqueue(job_id, countdown, queue)


def send_measurement(due: Due) -> None:
    JobQueue(get_settings(), app).measure(due.job_id, due.target, due.queue)


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """In the worker's main process: sweep for lost jobs now and on a timer, and say that this worker is
    alive (its class, pool and running tasks) now and every QAAS_WORKER_HEARTBEAT_S."""
    global _reaper, _heartbeat
    from celery.worker import state as worker_state

    settings = get_settings()
    factory = make_session_factory(make_engine(settings))
    _reaper = Reaper(factory, enqueue, settings, open_storage(settings), send_measurement)
    _reaper.start()
    _heartbeat = Heartbeat(
        factory, this_worker(), settings.worker_heartbeat_s, lambda: len(worker_state.active_requests)
    )
    _heartbeat.start()


class ResendOnReconnect(bootsteps.StartStopStep):
    """A consumer step: Celery restarts the consumer's steps each time it reconnects to the broker.
    After a reconnect (not the first connect) the broker may have lost every message (a Redis
    restarted without persistence), so the sweep re-sends all queued jobs at once. It also keeps the
    consumer, so that a warm shutdown can stop taking tasks (`_grace_then_hand_back`)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.connects = 0

    def start(self, parent: Any) -> None:
        global _consumer
        _consumer = parent
        self.connects += 1
        if self.connects > 1 and _reaper is not None:
            log.warning("broker connection is back: re-sending every queued job")
            _reaper.resend_all_soon()


@task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    """In the main process, as a message arrives (before any countdown it carries has run out): the sweep
    knows a worker has the job's message, and does not send it again."""
    if _reaper is not None and request is not None and request.name == RUN_JOB_TASK and request.args:
        _reaper.received(str(request.args[0]))


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
    _stop_heartbeat()


def _stop_heartbeat() -> None:
    global _heartbeat
    heartbeat, _heartbeat = _heartbeat, None
    if heartbeat is not None:
        heartbeat.stop()


@worker_shutting_down.connect
def _grace_then_hand_back(**_: Any) -> None:
    """SIGTERM (warm shutdown): Celery waits for running tasks however long they take. We wait
    QAAS_WORKER_SHUTDOWN_GRACE_S for them to finish, then ask each to hand its job back, so the
    worker exits promptly (before an orchestrator's SIGKILL) and no job waits for a lease to expire.
    The worker takes no new task meanwhile (from any of its queues): on kombu's filesystem transport (the
    embedded default) it went on consuming, and started the very job it had just handed back. Nor is it
    live from now on: jobs cannot target its class or pool on its account."""
    if _consumer is not None:
        for queue in this_worker().queues:
            with contextlib.suppress(Exception):  # a broker already gone: nothing to stop consuming from
                _consumer.cancel_task_queue(queue)
    threading.Thread(target=_stop_heartbeat, name="qaas-heartbeat-stop", daemon=True).start()
    threading.Thread(target=_hand_back_after_grace, name="qaas-shutdown-grace", daemon=True).start()


def _hand_back_after_grace() -> None:
    from celery.worker import state as worker_state

    deadline = time.monotonic() + get_settings().worker_shutdown_grace_s
    while worker_state.active_requests and time.monotonic() < deadline:
        time.sleep(0.1)
    for request in tuple(worker_state.active_requests):
        pid = request.worker_pid
        log.warning("shutdown grace over: process %s hands job %s back", pid, request.args)
        if pid == os.getpid():  # a pool without child processes (solo, threads)
            runner().stop_requested.set()
        elif pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # _on_sigterm in that pool process


_previous_sigterm: Any = signal.SIG_DFL


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM in a pool process: Celery stops a task this way (the broker connection was lost, a
    cold shutdown) and so does the shutdown grace above. A busy runner hands its job back and the
    task returns normally; an idle process exits through billiard's own handler, as before."""
    if _runner is not None and _runner.busy:
        _runner.stop_requested.set()
        return
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
        return
    signal.signal(signal.SIGTERM, _previous_sigterm)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_stop_handler() -> None:
    """Billiard sets its own SIGTERM handler after worker_process_init, so ours goes in at the
    first task, chaining to billiard's for an idle process."""
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return  # a threads pool: the shutdown grace sets stop_requested directly
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous_sigterm = current
        signal.signal(signal.SIGTERM, _on_sigterm)


def _new_runner() -> JobRunner:
    # The job processes it starts record this worker's class and pool in their results (worker/sandbox.py
    # passes this one variable on).
    os.environ.update(this_worker().placement.environ())
    return JobRunner.from_settings(enqueue=enqueue)


@worker_process_init.connect
def _start(**_: Any) -> None:
    global _runner
    _runner = _new_runner()


@worker_process_shutdown.connect
def _stop(**_: Any) -> None:
    if _runner is not None:
        _runner.close()


def runner() -> JobRunner:
    global _runner
    with _runner_lock:
        if _runner is None:  # solo pool or eager mode: no worker_process_init
            _runner = _new_runner()
        return _runner


@app.task(bind=True, name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self: Task, job_id: str) -> None:
    """Run one attempt of the job. Idempotent: a job that is not `queued` is left alone, so a
    duplicated, late or re-sent message is harmless. When the database cannot be reached to claim
    the job, the message is retried with backoff rather than dropped."""
    _install_stop_handler()
    try:
        runner().run(job_id)
        # A job that just succeeded with a target of several classes or pools is measured on the others.
        ask_now(runner().session_factory, send_measurement, job_id, get_settings())
    except DatabaseUnavailable as exc:
        retries = self.request.retries
        countdown = min(60, 2**retries)
        log.warning(
            "job %s could not be claimed: %s; retry %d of %d in %d s",
            job_id,
            exc,
            retries + 1,
            CLAIM_RETRIES,
            countdown,
        )
        raise self.retry(exc=exc, countdown=countdown, max_retries=CLAIM_RETRIES) from exc


@app.task(name=MEASURE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def measure_job(job_id: str, target: str) -> None:
    """Measure a succeeded job's models on this worker for its `target`, if that is still pending.
    Idempotent: a duplicated or late message finds the measurement recorded and does nothing."""
    made = runner()
    Measurer(made.settings, made.session_factory, made.inputs).measure(job_id, target)
