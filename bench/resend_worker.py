"""The workers of `bench/resend.py`: Celery workers with the service's own queue configuration whose
`qaas.run_job` claims the job and records it as done, running no engine, so that draining a queue costs
what the queue costs. Like a real worker they record the messages they receive (`worker.reaper.Receipts`).
Each delivery is one line in `$QAAS_DATA_DIR/deliveries-<pid>.txt`: the job id and whether its claim
succeeded (a failed claim is a duplicate: the job had already run).

    QAAS_DATA_DIR=... python -m celery -A bench.resend_worker worker -P solo -Q qaas"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_ready
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory, transaction
from service.jobs import state
from service.queue import RUN_JOB_TASK, make_celery
from service.settings import get_settings
from worker.reaper import Receipts

app: Celery = make_celery(get_settings(), "qaas-bench-resend")
_factory: sessionmaker[Session] | None = None
_receipts: Receipts | None = None


def _sessions() -> sessionmaker[Session]:
    global _factory
    if _factory is None:
        _factory = make_session_factory(make_engine(get_settings()))
    return _factory


@worker_ready.connect
def _start(**_: Any) -> None:
    global _receipts
    _receipts = Receipts(_sessions())
    _receipts.start()


@task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    if _receipts is not None and request is not None and request.name == RUN_JOB_TASK and request.args:
        _receipts.add(str(request.args[0]))


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> None:
    settings = get_settings()
    with transaction(_sessions()) as session:
        attempt = state.claim(session, job_id, settings.job_lease_s)
        if attempt is not None:
            state.succeed(session, job_id, attempt, {})
    with (settings.resolved_data_dir / f"deliveries-{os.getpid()}.txt").open("a") as out:
        out.write(f"{job_id} {'claimed' if attempt is not None else 'duplicate'}\n")
