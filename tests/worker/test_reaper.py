"""The sweep that finds lost jobs, on a real database."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.database import transaction, utcnow
from service.jobs import state
from service.settings import Settings
from service.tables import Job
from tests.s3 import dead_object_store
from tests.service.test_job_state import _job
from worker.reaper import sweep


def test_sweep_requeues_then_fails_a_job_whose_worker_vanished(
    db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    settings = db_settings.model_copy(update={"job_max_attempts": 2, "queued_resend_s": 3600})
    factory = session_factory
    job_id = _job(factory)
    sent: list[str] = []

    def expire() -> None:
        with transaction(factory) as s:
            past = utcnow() - timedelta(seconds=1)
            s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))

    with transaction(factory) as s:
        state.claim(s, job_id, 60)
    nothing: dict[str, list[str]] = {k: [] for k in ("requeued", "failed", "cancelled", "resent", "unsent")}
    assert sweep(factory, sent.append, settings) == nothing
    expire()
    assert sweep(factory, sent.append, settings)["requeued"] == [job_id]
    assert sent == [job_id]
    with transaction(factory) as s:
        assert state.claim(s, job_id, 60) == 2
    expire()
    assert sweep(factory, sent.append, settings)["failed"] == [job_id]
    assert sent == [job_id]
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and job.error is not None
        assert job.error["code"] == "worker_lost" and job.attempts == 2


def test_sweep_resends_jobs_queued_for_too_long(db_settings: Settings, session_factory: sessionmaker[Session]) -> None:
    settings = db_settings.model_copy(update={"queued_resend_s": 1})
    factory = session_factory
    job_id = _job(factory)
    assert sweep(factory, [].append, settings)["resent"] == []
    with transaction(factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(seconds=5)))

    def broker_down(_: str) -> None:
        raise ConnectionError("broker down")

    assert sweep(factory, broker_down, settings)["resent"] == []  # retried on the next sweep
    sent: list[str] = []
    assert sweep(factory, sent.append, settings)["resent"] == [job_id]
    assert sent == [job_id]
    assert sweep(factory, sent.append, settings)["resent"] == []  # touched: not resent at once


def test_sweep_requeues_and_resends_a_lost_job_while_object_storage_is_down(
    db_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Removing the lost attempt's files is best effort: the job must not wait QAAS_QUEUED_RESEND_S
    for its message because storage did not answer."""
    factory = session_factory
    job_id = _job(factory)
    with transaction(factory) as s:
        state.claim(s, job_id, 60)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    sent: list[str] = []
    done = sweep(factory, sent.append, db_settings, dead_object_store())
    assert done["requeued"] == [job_id] and sent == [job_id]
