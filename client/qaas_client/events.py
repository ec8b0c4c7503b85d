"""Following a job: its Server-Sent Events stream, resumed with `Last-Event-ID` when the connection
drops, or polling `GET /v1/jobs/{id}` against a service that has no stream."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from qaas_client.errors import InvalidInputError, NotFoundError
from qaas_client.http import Http
from qaas_client.types import JobUpdate

log = logging.getLogger(__name__)

# Longer than any heartbeat interval a service would use, so a silent stream means a dead connection.
STREAM_READ_TIMEOUT_S = 60.0
MAX_RECONNECTS = 5
DEFAULT_RETRY_S = 1.0
POLL_START_S = 0.5
POLL_MAX_S = 2.0


def update_from_job(job: dict[str, Any]) -> JobUpdate:
    update = update_from_event(job, None)
    assert update is not None, job
    return update


def update_from_event(data: Any, current: JobUpdate | None) -> JobUpdate | None:
    """The JSON of a `status` or `progress` event (a JobEvent), or of `end` (the whole Job), as an
    update; fields an event leaves out keep their current value. None for data without job state."""
    if not isinstance(data, dict) or not any(k in data for k in ("status", "stage", "progress")):
        return None
    found = data.get("candidate")
    candidate = found if isinstance(found, dict) else {}  # {"index": 2, "total": 5, "name": "..."}
    previous = current or JobUpdate("queued", "queued", 0.0)
    return JobUpdate(
        status=str(data.get("status", previous.status)),
        stage=str(data.get("stage", previous.stage)),
        progress=float(data.get("progress", previous.progress)),
        candidate=_int(candidate.get("index")),
        candidates=_int(candidate.get("total")),
        candidate_name=candidate.get("name") if isinstance(candidate.get("name"), str) else None,
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def follow(http: Http, job_id: str, *, stream: bool = True) -> Iterator[JobUpdate]:
    """Yields the job's updates until it ends; the last one is terminal."""
    if stream:
        try:
            yield from _stream(http, job_id)
            return
        except _NoStream:
            log.info("the service has no event stream for jobs; polling instead")
    yield from _poll(http, job_id)


class _NoStream(Exception):
    pass


def _stream(http: Http, job_id: str) -> Iterator[JobUpdate]:
    last_id: str | None = None
    current: JobUpdate | None = None
    fruitless = 0  # connections in a row that ended without news
    retry_s = DEFAULT_RETRY_S
    while True:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            response = http.send(
                "GET", f"/v1/jobs/{job_id}/events", stream=True, headers=headers, read_timeout=STREAM_READ_TIMEOUT_S
            )
        except (NotFoundError, InvalidInputError) as exc:
            if exc.status not in (404, 405):
                raise
            # 404 for an unknown job too: tell the two apart by asking for the job itself.
            http.json("GET", f"/v1/jobs/{job_id}")
            raise _NoStream from exc
        fruitless += 1
        if response.status_code == 204:  # the service already sent this client the job's end
            response.close()
            yield update_from_job(http.json("GET", f"/v1/jobs/{job_id}"))
            return
        log.info("following job %s through its event stream%s", job_id, f" from event {last_id}" if last_id else "")
        try:
            for event in EventSource(response).iter_sse():
                if event.id:
                    last_id = event.id
                if event.retry is not None:
                    retry_s = event.retry / 1000
                try:
                    data = json.loads(event.data) if event.data else None
                except ValueError:
                    continue
                update = update_from_event(data, current)
                if update is None or update == current:
                    continue
                current, fruitless = update, 0
                yield update
                if update.done:
                    return
        except SSEError as exc:
            raise _NoStream from exc
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            log.info("event stream of job %s dropped (%s); resuming after event %s", job_id, exc, last_id)
        finally:
            response.close()
        # The stream ended or dropped before a terminal event: the job itself says whether it is over.
        job = update_from_job(http.json("GET", f"/v1/jobs/{job_id}"))
        if job.done:
            yield job
            return
        if fruitless > MAX_RECONNECTS:
            raise _NoStream
        http.sleep(retry_s)  # what the stream's `retry:` asked for, as a browser's EventSource would


def _poll(http: Http, job_id: str) -> Iterator[JobUpdate]:
    current: JobUpdate | None = None
    interval = POLL_START_S
    while True:
        update = update_from_job(http.json("GET", f"/v1/jobs/{job_id}"))
        if update != current:
            current = update
            yield update
            interval = POLL_START_S
        if update.done:
            return
        http.sleep(interval)
        interval = min(POLL_MAX_S, interval * 1.25)
