"""Following a job: the event stream as the service writes it, resumed after a drop, and polling
against a service without one."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from qaas_client import Job, JobCancelledError, JobFailedError, JobUpdate, NotFoundError
from tests.client.conftest import scripted


def job(status: str, stage: str, progress: float, **extra: Any) -> dict[str, Any]:
    return {"id": "j1", "status": status, "stage": stage, "progress": progress, "recipe": {}, **extra}


def sse(*events: tuple[str, str, dict[str, Any]]) -> httpx.Response:
    body = "".join(f"event: {name}\nid: {id_}\ndata: {json.dumps(data)}\n\n" for name, id_, data in events)
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=(": ping\nretry: 2000\n\n" + body).encode()
    )


def event(status: str, stage: str, progress: float, candidate: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "job_id": "j1",
        "status": status,
        "stage": stage,
        "progress": progress,
        "attempts": 1,
        "candidate": candidate,
    }


class Service:
    """Answers /v1/jobs/j1/events from a list of responses (one per connection) and GET /v1/jobs/j1
    from a list of jobs (the last one repeats); records the Last-Event-ID of each connection."""

    def __init__(self, streams: list[httpx.Response], jobs: list[dict[str, Any]]) -> None:
        self.streams, self.jobs = streams, jobs
        self.last_event_ids: list[str | None] = []
        self.gets = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/j1/events":
            self.last_event_ids.append(request.headers.get("last-event-id"))
            return self.streams.pop(0)
        if request.url.path == "/v1/jobs/j1":
            self.gets += 1
            return httpx.Response(200, json=self.jobs[min(self.gets, len(self.jobs)) - 1])
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no", "detail": {}}})


def test_updates_follow_the_stream_to_its_end_event() -> None:
    service = Service(
        [
            sse(
                ("status", "1.0", event("queued", "queued", 0.0)),
                ("status", "2.0", event("running", "validating", 0.0)),
                ("progress", "3.1", event("running", "calibrating", 0.3)),
                ("progress", "4.1", event("running", "quantizing", 0.5, {"index": 2, "total": 5, "name": "dynamic"})),
                ("end", "5.2", job("succeeded", "done", 1.0)),
            )
        ],
        [job("succeeded", "done", 1.0, result={})],
    )
    updates: list[JobUpdate] = []
    with scripted(service) as client:
        done = client.get_job("j1")
        done.raw = job("queued", "queued", 0.0)
        done.wait(on_update=updates.append)
    assert [(u.status, u.stage, u.progress) for u in updates] == [
        ("queued", "queued", 0.0),
        ("running", "validating", 0.0),
        ("running", "calibrating", 0.3),
        ("running", "quantizing", 0.5),
        ("succeeded", "done", 1.0),
    ]
    assert (updates[3].candidate, updates[3].candidates, updates[3].candidate_name) == (2, 5, "dynamic")
    assert done.status == "succeeded" and service.last_event_ids == [None]


def test_a_dropped_stream_resumes_after_the_last_event_it_delivered() -> None:
    service = Service(
        [
            sse(("status", "10.0", event("running", "calibrating", 0.2))),  # then the connection ends
            sse(("progress", "11.1", event("running", "evaluating", 0.8)), ("end", "12.2", job("failed", "done", 1.0))),
        ],
        [job("running", "calibrating", 0.2)],
    )
    sleeps: list[float] = []
    with scripted(service, sleeps) as client:
        updates = list(client.get_job("j1").updates())
    assert [u.stage for u in updates] == ["calibrating", "evaluating", "done"] and updates[-1].status == "failed"
    assert service.last_event_ids == [None, "10.0"]
    assert sleeps == [2.0]  # the stream's `retry: 2000` before reconnecting


def test_a_stream_whose_end_was_already_delivered_answers_204_and_the_job_is_read() -> None:
    service = Service(
        [sse(("status", "10.0", event("running", "calibrating", 0.2))), httpx.Response(204)],
        [job("running", "calibrating", 0.2), job("running", "calibrating", 0.2), job("cancelled", "done", 0.2)],
    )
    with scripted(service) as client:
        updates = list(client.get_job("j1").updates())
    assert updates[-1].status == "cancelled" and service.last_event_ids == [None, "10.0"]


def test_without_an_event_stream_the_job_is_polled() -> None:
    missing = httpx.Response(404, json={"error": {"code": "not_found", "message": "No endpoint", "detail": {}}})
    service = Service(
        [missing],
        [
            job("queued", "queued", 0.0),  # get_job
            job("queued", "queued", 0.0),  # is the job there? (the 404 was the endpoint's)
            job("running", "calibrating", 0.3),
            job("running", "calibrating", 0.3),
            job("succeeded", "done", 1.0),
        ],
    )
    sleeps: list[float] = []
    with scripted(service, sleeps) as client:
        updates = list(client.get_job("j1").updates())
    assert [u.status for u in updates] == ["running", "succeeded"]
    assert sleeps and all(s > 0 for s in sleeps)


def test_an_unknown_job_is_not_found_rather_than_polled() -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "No job", "detail": {}}})

    with scripted(answer) as client, pytest.raises(NotFoundError):
        list(Job(client, job("queued", "queued", 0)).updates())


@pytest.mark.parametrize(("status", "error_cls"), [("failed", JobFailedError), ("cancelled", JobCancelledError)])
def test_wait_raises_the_jobs_error_code(status: str, error_cls: type[JobFailedError]) -> None:
    error = {"code": "quantization_failed" if status == "failed" else "cancelled", "message": "it broke", "detail": {}}
    ended = job(status, "done", 1.0, error=error)
    service = Service([sse(("end", "1.2", ended))], [ended])
    with scripted(service) as client:
        running = client.get_job("j1")
        running.raw = job("running", "calibrating", 0.1)
        with pytest.raises(error_cls) as raised:
            running.wait()
        assert running.wait(raise_on_failure=False).status == status
    assert raised.value.code == error["code"] and raised.value.job_id == "j1" and raised.value.message == "it broke"
