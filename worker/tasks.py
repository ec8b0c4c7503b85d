"""Celery tasks: thin wrappers that pass a job id to the runner."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from service.database import make_engine, make_session_factory
from service.queue import QUEUE, RUN_JOB_TASK
from service.settings import get_settings
from worker.celery_app import app
from worker.reaper import Reaper
from worker.runner import JobRunner

log = logging.getLogger(__name__)
_runner: JobRunner | None = None
_reaper: Reaper | None = None


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """In the worker's main process: sweep for lost jobs now and on a timer."""
    global _reaper
    settings = get_settings()
    factory = make_session_factory(make_engine(settings))
    _reaper = Reaper(factory, lambda job_id: app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE), settings)
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()


@worker_process_init.connect
def _start(**_: Any) -> None:
    global _runner
    _runner = JobRunner.from_settings()


@worker_process_shutdown.connect
def _stop(**_: Any) -> None:
    if _runner is not None:
        _runner.close()


def runner() -> JobRunner:
    global _runner
    if _runner is None:  # solo pool or eager mode: no worker_process_init
        _runner = JobRunner.from_settings()
    return _runner


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run one attempt of the job. Idempotent: a job that is not `queued` is left alone."""
    runner().run(job_id)
