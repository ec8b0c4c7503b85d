"""Polling a job (`service.jobs.polling`): the answer is serialized once per version of the row, every change
is seen on the next poll, and a kept answer never outlives its job or crosses tenants."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from service.database import transaction
from service.errors import NotFound
from service.jobs import state
from service.jobs.polling import PolledJobs
from service.jobs.schemas import JobOut
from service.tables import Job
from tests.service.test_job_state import _job

Factory = sessionmaker[Session]


def _polled(factory: Factory, **budget: int) -> PolledJobs:
    return PolledJobs(factory.kw["bind"], factory, **budget)


def _fresh(factory: Factory, job_id: str) -> bytes:
    with factory() as s:
        return JobOut.model_validate(s.get(Job, job_id)).model_dump_json().encode()


def test_an_unchanged_job_is_loaded_once_and_every_change_is_seen_on_the_next_poll(session_factory: Factory) -> None:
    factory = session_factory
    polled = _polled(factory)
    job_id = _job(factory)
    first = polled.body("default", job_id)
    assert first == _fresh(factory, job_id)
    assert [polled.body("default", job_id) for _ in range(5)] == [first] * 5
    assert polled.loads == 1

    seen = []
    for change in (
        lambda s: state.claim(s, job_id, 60),
        lambda s: state.progress(s, job_id, 1, "calibrating", 0.5, 60),
        lambda s: state.succeed(s, job_id, 1, {"x": 1}),
    ):
        with transaction(factory) as s:
            assert change(s)
        body = polled.body("default", job_id)
        assert body == _fresh(factory, job_id)
        assert polled.body("default", job_id) is body  # kept again for this version
        seen.append(json.loads(body))
    assert [(j["status"], j["stage"], j["progress"]) for j in seen] == [
        ("running", "validating", 0.0),
        ("running", "calibrating", 0.5),
        ("succeeded", "done", 1.0),
    ]
    assert seen[-1]["result"] == {"x": 1}
    assert polled.loads == 4


def test_a_kept_answer_is_never_served_for_a_deleted_job_or_to_another_tenant(session_factory: Factory) -> None:
    factory = session_factory
    polled = _polled(factory)
    job_id = _job(factory)
    polled.body("default", job_id)
    with pytest.raises(NotFound):
        polled.body("someone-else", job_id)
    with transaction(factory) as s:
        s.execute(delete(Job).where(Job.id == job_id))
    with pytest.raises(NotFound):
        polled.body("default", job_id)
    assert polled.bytes == 0


def test_the_kept_answers_stay_within_their_budget(session_factory: Factory) -> None:
    factory = session_factory
    jobs = [_job(factory) for _ in range(6)]
    size = len(_fresh(factory, jobs[0]))
    polled = _polled(factory, max_bytes=size * 2 + size // 2, max_body=size * 2)  # room for two answers
    for job_id in jobs:
        polled.body("default", job_id)
    assert 0 < polled.bytes <= polled.max_bytes
    loads = polled.loads
    polled.body("default", jobs[-1])  # the newest is still kept
    assert polled.loads == loads
    polled.body("default", jobs[-2])
    assert polled.loads == loads
    polled.body("default", jobs[0])  # the oldest was pushed out
    assert polled.loads == loads + 1
