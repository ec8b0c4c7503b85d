"""GET /v1/jobs/{id}/events on a live server: the events a client sees as a job moves, resuming with
Last-Event-ID, heartbeats, and one database query per poll whatever the number of streams."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from core.progress import CandidateProgress, Note
from service.database import transaction
from service.jobs import state
from tests.service.conftest import LiveServer
from tests.service.helpers import conv_model_and_data
from tests.sse import Event, EventReader

RESULT = {"original": {"size_bytes": 100}, "quantized": {"size_bytes": 30}, "comparison": {"size_ratio": 0.3}}
pytestmark = pytest.mark.timeout(60)


def _job(http: httpx.Client, tmp_path: Path) -> str:
    model, dataset = conv_model_and_data(http, tmp_path)  # type: ignore[arg-type]
    response = http.post("/v1/jobs", json={"model_id": model["id"], "calibration_dataset_id": dataset["id"]})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@contextmanager
def _stream(http: httpx.Client, job_id: str, last_event_id: str | None = None) -> Iterator[EventReader]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        yield EventReader(response)


def _next(reader: EventReader) -> Event:
    found = reader.next()
    assert found is not None, "the stream ended early"
    return found


def _write(live: LiveServer, fn: Any) -> Any:
    with transaction(live.state.session_factory) as session:
        return fn(session)


def test_a_stream_follows_the_job_to_its_end(live: LiveServer, tmp_path: Path) -> None:
    with httpx.Client(base_url=live.url, timeout=20) as http:
        job_id = _job(http, tmp_path)
        with _stream(http, job_id) as events:
            first, second = _next(events), _next(events)
            assert (first.event, first.data["status"]) == ("status", "queued")
            assert (second.event, second.data["stage"], second.data["progress"]) == ("progress", "queued", 0)
            attempt = _write(live, lambda s: state.claim(s, job_id, 60))
            running = _next(events)
            assert (running.event, running.data["status"], running.data["attempts"]) == ("status", "running", 1)
            assert _next(events).data["stage"] == "validating"
            name = "static QDQ, per-channel, Percentile"
            note = Note(f"candidate 2 of 5: {name}", CandidateProgress(2, 5, name))
            _write(live, lambda s: state.progress(s, job_id, attempt, "quantizing", 0.55, 60, note))
            moved = _next(events)
            assert moved.event == "progress"
            assert (moved.data["stage"], moved.data["progress"]) == ("quantizing", 0.55)
            said = {"progress_note": note.text, "candidate": {"index": 2, "total": 5, "name": name}}
            assert {k: moved.data[k] for k in said} == said
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert {k: job[k] for k in said} == said
            _write(live, lambda s: state.succeed(s, job_id, attempt, RESULT))
            rest = events.until_end()
        assert [e.event for e in rest] == ["status", "progress", "end"]
        assert rest[0].data["status"] == "succeeded"
        assert rest[1].data["candidate"] is None and rest[1].data["progress_note"] is None
        assert rest[2].data == http.get(f"/v1/jobs/{job_id}").json()
        ids = [e.id for e in (first, second, running, moved, *rest)]
        assert len(set(ids)) == len(ids)
        # A stream opened on an ended job gives its state and the end at once.
        with _stream(http, job_id) as events:
            assert [e.event for e in events.until_end()] == ["status", "progress", "end"]


def test_last_event_id_resumes_without_repeats(live: LiveServer, tmp_path: Path) -> None:
    with httpx.Client(base_url=live.url, timeout=20) as http:
        job_id = _job(http, tmp_path)
        with _stream(http, job_id) as events:
            queued = [_next(events), _next(events)]
        attempt = _write(live, lambda s: state.claim(s, job_id, 60))
        with _stream(http, job_id, last_event_id=queued[1].id) as events:
            status = _next(events)
            assert (status.event, status.data["status"]) == ("status", "running")
        # It got the status of this state but not its progress: only the progress comes.
        with _stream(http, job_id, last_event_id=status.id) as events:
            progress = _next(events)
            assert (progress.event, progress.data["stage"]) == ("progress", "validating")
            _write(live, lambda s: state.fail(s, job_id, attempt, {"code": "timeout", "message": "m", "detail": {}}))
            ended = events.until_end()
        # A failure leaves stage and progress where they were: no progress event.
        assert [e.event for e in ended] == ["status", "end"]
        assert ended[0].data["status"] == "failed" and ended[-1].data["error"]["code"] == "timeout"
        with _stream(http, job_id, last_event_id=ended[0].id) as events:
            assert [e.event for e in events.until_end()] == ["progress", "end"]
        # Everything delivered: 204 tells an EventSource to stop reconnecting.
        done = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ended[-1].id or ""})
        assert done.status_code == 204 and done.content == b""
        # An id this server never wrote counts as none: the whole state again.
        with _stream(http, job_id, last_event_id="garbage") as events:
            assert [e.event for e in events.until_end()] == ["status", "progress", "end"]


def test_progress_is_coalesced_but_a_new_stage_goes_out_at_once(live: LiveServer, tmp_path: Path) -> None:
    hub = live.state.event_hub
    interval = hub.progress_interval_s
    with httpx.Client(base_url=live.url, timeout=20) as http:
        job_id = _job(http, tmp_path)
        with _stream(http, job_id) as events:
            assert [_next(events).event, _next(events).event] == ["status", "progress"]
            attempt = _write(live, lambda s: state.claim(s, job_id, 60))
            assert [_next(events).event, _next(events).event] == ["status", "progress"]

            def at(stage: str, fraction: float) -> None:
                _write(live, lambda s: state.progress(s, job_id, attempt, stage, fraction, 60))

            # The worker writes progress often; the streams get it at most once per interval, newest first.
            started = time.monotonic()
            fractions = [round(0.3 + i / 300, 4) for i in range(61)]
            for fraction in fractions:
                at("quantizing", fraction)
                time.sleep(0.02)
            seen = [_next(events)]
            while seen[-1].data["progress"] != fractions[-1]:
                seen.append(_next(events))
            elapsed = time.monotonic() - started
            assert all(e.event == "progress" and e.data["stage"] == "quantizing" for e in seen)
            shown = [e.data["progress"] for e in seen]
            assert shown == sorted(set(shown)), shown
            # One event at the new stage, then at most one per interval: far fewer than the polls.
            assert len(seen) <= elapsed / interval + 2, (len(seen), elapsed)
            assert len(seen) >= 2, "progress was held until it stopped moving"
            # Held for a minute, progress never goes out; the next stage does, with its own progress.
            hub.progress_interval_s = 60
            at("quantizing", 0.55)
            at("evaluating", 0.7)
            moved = _next(events)
            assert (moved.event, moved.data["stage"], moved.data["progress"]) == ("progress", "evaluating", 0.7)
            _write(live, lambda s: state.succeed(s, job_id, attempt, RESULT))
            assert [e.event for e in events.until_end()] == ["status", "progress", "end"]


def test_idle_streams_get_heartbeats_and_cost_one_query_per_poll(live: LiveServer, tmp_path: Path) -> None:
    engine = live.state.engine
    hub = live.state.event_hub
    with httpx.Client(base_url=live.url, timeout=20) as http, ExitStack() as stack:
        jobs = [_job(http, tmp_path / str(i)) for i in range(4)]
        readers = []
        for i in range(20):
            reader = stack.enter_context(_stream(http, jobs[i % 4]))
            assert [_next(reader).event, _next(reader).event] == ["status", "progress"]
            readers.append(reader)
        assert hub.open_streams == 20 and len(hub.watches) == 4
        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        try:
            polls = hub.polls
            while hub.polls < polls + 10:  # ten polls with twenty open streams
                time.sleep(0.05)
            # Heartbeats reach an idle stream (its next line is a comment, not an event).
            line = next(readers[0].lines)
            while not line:
                line = next(readers[0].lines)
            assert line.startswith(":"), line
        finally:
            event.remove(engine, "before_cursor_execute", count)
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        assert selects, "the poller made no query"
        assert all("jobs.id IN" in " ".join(s.split()) for s in selects), selects
        assert len(selects) <= hub.polls - polls + 1  # one per poll, not one per stream
    # Closed streams are let go (the poller stops once none is left).
    deadline = time.monotonic() + 10
    while hub.watches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.open_streams == 0 and hub.watches == {}
