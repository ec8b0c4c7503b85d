"""The sweep that finds lost jobs and lost messages, on a real database and a real broker."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory, transaction, utcnow
from service.jobs import state
from service.queue import QUEUE, JobQueue
from service.settings import Settings
from service.tables import Job
from tests.conftest import redis_prefix
from tests.s3 import dead_object_store
from tests.service.test_job_state import _job
from worker.reaper import Receipts, sweep


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


class Clock:
    """The state machine's clock, moved on by hand: QAAS_QUEUED_RESEND_S passes without waiting for it."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    made = Clock()
    monkeypatch.setattr(state, "utcnow", made)
    return made


@pytest.fixture
def broker_settings(db_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """SQLite with the filesystem broker (embedded), PostgreSQL with Redis on a key prefix of the test's own."""
    if db_settings.resolved_database_url.startswith("sqlite"):
        return db_settings
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"
    return db_settings.model_copy(update={"broker_url": redis_url, "broker_key_prefix": prefix})


def queue_length(settings: Settings) -> int:
    """Run messages in the broker's queue, counted as an operator would: Redis's LLEN, or the transport's files."""
    if settings.is_embedded:
        return len(list((settings.broker_dir / "queue").glob(f"*.{QUEUE}.msg")))
    client = redis.Redis.from_url(settings.resolved_broker_url)
    try:
        return int(client.llen(f"{settings.broker_key_prefix}{QUEUE}"))
    finally:
        client.close()


def purge_queue(settings: Settings) -> None:
    """What a Redis restarted without persistence does to the queue."""
    if settings.is_embedded:
        for path in (settings.broker_dir / "queue").glob("*.msg"):
            path.unlink()
        return
    client = redis.Redis.from_url(settings.resolved_broker_url)
    try:
        client.delete(f"{settings.broker_key_prefix}{QUEUE}")
    finally:
        client.close()


def test_a_backlog_without_a_worker_keeps_one_message_per_job(
    broker_settings: Settings, session_factory: sessionmaker[Session], clock: Clock
) -> None:
    """Jobs that wait in the queue longer than QAAS_QUEUED_RESEND_S (no worker takes them) are not sent again
    each interval: their messages are still there. Once the broker loses them, each is sent again once."""
    settings = broker_settings.model_copy(update={"queued_resend_s": 60})
    queue = JobQueue(settings)
    try:
        jobs = [_job(session_factory) for _ in range(5)]
        for job_id in jobs:  # as the API does after the commit
            queue.enqueue(job_id)
        assert queue_length(settings) == 5
        for _ in range(3):
            clock.advance(61)
            done = sweep(session_factory, queue.enqueue, settings, confirm_s=0)
            assert done["resent"] == [] and done["unsent"] == []
        assert queue_length(settings) == 5

        purge_queue(settings)
        clock.advance(61)
        assert sorted(sweep(session_factory, queue.enqueue, settings, confirm_s=0)["resent"]) == sorted(jobs)
        assert sweep(session_factory, queue.enqueue, settings, confirm_s=0)["resent"] == []
        clock.advance(61)
        assert sweep(session_factory, queue.enqueue, settings, confirm_s=0)["resent"] == []
        assert queue_length(settings) == 5
    finally:
        queue.close()


def test_a_job_a_worker_received_is_not_sent_again_within_the_interval(
    broker_settings: Settings, session_factory: sessionmaker[Session], clock: Clock
) -> None:
    """A worker that took the message (and may hold it until a countdown) records it; the broker no longer has
    it, yet the sweep waits QAAS_QUEUED_RESEND_S from that receipt before it counts the message as lost."""
    settings = broker_settings.model_copy(update={"queued_resend_s": 60})
    job_id = _job(session_factory)
    clock.advance(120)
    receipts = Receipts(session_factory)
    receipts.add(job_id)
    receipts.flush()
    sent: list[str] = []
    assert sweep(session_factory, sent.append, settings, confirm_s=0)["resent"] == []
    clock.advance(61)
    assert sweep(session_factory, sent.append, settings, confirm_s=0)["resent"] == [job_id]
    assert sent == [job_id]


@pytest.mark.services
def test_a_message_a_worker_holds_unacknowledged_is_not_sent_again(
    postgres_settings: Settings, redis_url: str, clock: Clock
) -> None:
    """On Redis a delivered message stays in the broker until it is acknowledged (a countdown's, the running
    job's): however long the job has been queued, it is not lost."""
    settings = postgres_settings.model_copy(
        update={"broker_url": redis_url, "broker_key_prefix": f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"}
    )
    factory = make_session_factory(make_engine(settings))
    queue = JobQueue(settings)
    try:
        job_id = _job(factory)
        queue.enqueue(job_id, countdown=3600)
        with queue.app.connection_for_read() as conn:
            held = conn.default_channel.basic_get(QUEUE, no_ack=False)  # a worker holds it, unacknowledged
            assert held is not None and queue_length(settings) == 0
            clock.advance(7200)
            assert sweep(factory, queue.enqueue, settings, confirm_s=0)["resent"] == []
            assert queue_length(settings) == 0
    finally:
        queue.close()
        bind = factory.kw["bind"]
        bind.dispose()


def test_a_message_a_worker_has_just_taken_is_not_sent_again(
    db_settings: Settings, session_factory: sessionmaker[Session], clock: Clock
) -> None:
    """Between the sweep's two looks at the broker, a worker that took the message claims the job."""
    settings = db_settings.model_copy(update={"queued_resend_s": 60})
    job_id = _job(session_factory)  # its message is gone from the broker: a worker holds it, not yet claimed
    clock.advance(61)

    def claim() -> None:
        with transaction(session_factory) as s:
            state.claim(s, job_id, 60)

    claiming = threading.Timer(0.2, claim)
    claiming.start()
    sent: list[str] = []
    try:
        assert sweep(session_factory, sent.append, settings, confirm_s=1.0)["resent"] == []
    finally:
        claiming.join()
    assert sent == []


def test_sweeps_at_once_send_a_lost_message_once(
    db_settings: Settings, session_factory: sessionmaker[Session], clock: Clock
) -> None:
    settings = db_settings.model_copy(update={"queued_resend_s": 60})
    job_id = _job(session_factory)
    clock.advance(61)

    def broker_down(_: str) -> None:
        raise ConnectionError("broker down")

    assert sweep(session_factory, broker_down, settings, confirm_s=0)["unsent"] == [job_id]  # retried by the next sweep
    sent: list[str] = []
    with transaction(session_factory) as s:
        assert state.mark_sent(s, [job_id], 60) == [job_id]  # another worker's sweep got there first
    assert sweep(session_factory, sent.append, settings, confirm_s=0)["resent"] == []
    clock.advance(61)
    assert sweep(session_factory, sent.append, settings, confirm_s=0)["resent"] == [job_id]
    assert sent == [job_id]


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
