"""Celery tasks: thin wrappers that pass a job id to the runner."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from service.queue import RUN_JOB_TASK
from worker.celery_app import app
from worker.runner import JobRunner

log = logging.getLogger(__name__)
_runner: JobRunner | None = None


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
