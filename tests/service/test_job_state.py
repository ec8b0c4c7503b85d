"""The job state machine on a real database: compare-and-set transitions only."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.database import transaction, utcnow
from service.jobs import state
from service.storage import Storage
from service.tables import Job
from tests.service.helpers import model_row

Factory = sessionmaker[Session]


def _job(factory: Factory) -> str:
    with transaction(factory) as s:
        model = model_row()
        s.add(model)
        s.flush()
        job = Job(model_id=model.id, recipe={"mode": "dynamic"}, evaluation={})
        s.add(job)
        s.flush()
        return job.id


def store_job_model(storage: Storage) -> None:
    """The file `_job`'s model row names, for a real runner (it fetches the model before the job starts)."""
    writer = storage.writer("models/x/model.onnx")
    writer.write(b"m")
    writer.commit()


def test_a_job_is_claimed_once(session_factory: Factory) -> None:
    factory = session_factory
    job_id = _job(factory)
    with transaction(factory) as s:
        assert state.claim(s, job_id, 60) == 1
    with transaction(factory) as s:
        assert state.claim(s, job_id, 60) is None  # the duplicated message
        assert s.get(Job, job_id).status == "running"  # type: ignore[union-attr]


def test_a_stale_attempt_cannot_touch_the_job(session_factory: Factory) -> None:
    factory = session_factory
    job_id = _job(factory)
    with transaction(factory) as s:
        attempt = state.claim(s, job_id, 60)
        assert attempt == 1
    with transaction(factory) as s:
        assert not state.progress(s, job_id, 2, "calibrating", 0.5, 60)
        assert not state.succeed(s, job_id, 2, {"x": 1})
        assert state.progress(s, job_id, 1, "calibrating", 0.5, 60)
        assert state.succeed(s, job_id, 1, {"x": 1})
    with transaction(factory) as s:
        assert not state.fail(s, job_id, 1, {"code": "internal"})  # finished jobs stay finished
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.result == {"x": 1} and job.progress == 1.0


def test_cancel_queued_and_running(session_factory: Factory) -> None:
    factory = session_factory
    queued, running = _job(factory), _job(factory)
    with transaction(factory) as s:
        state.claim(s, running, 60)
    with transaction(factory) as s:
        state.request_cancel(s, s.get(Job, queued))  # type: ignore[arg-type]
        state.request_cancel(s, s.get(Job, running))  # type: ignore[arg-type]
    with transaction(factory) as s:
        assert s.get(Job, queued).status == "cancelled"  # type: ignore[union-attr]
        assert state.claim(s, queued, 60) is None  # a cancelled job never starts
        assert s.get(Job, running).status == "running"  # type: ignore[union-attr]
        assert state.cancel_requested(s, running)


def test_expired_leases_are_found_and_requeued_or_failed(session_factory: Factory) -> None:
    factory = session_factory
    job_id = _job(factory)
    with transaction(factory) as s:
        state.claim(s, job_id, 60)
    with transaction(factory) as s:
        assert state.expired_running(s) == []
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with transaction(factory) as s:
        assert state.expired_running(s) == [(job_id, 1)]
        assert state.requeue_lost(s, job_id, 1)
    with transaction(factory) as s:
        assert state.claim(s, job_id, 60) == 2
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with transaction(factory) as s:
        assert state.fail_lost(s, job_id, 2, max_attempts=2)
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and job.error["code"] == "worker_lost"  # type: ignore[index]
