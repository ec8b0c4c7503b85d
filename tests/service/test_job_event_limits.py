"""GET /v1/jobs/{id}/events within bounds, on a live server with auth on: open streams capped per key and
per process (429 with Retry-After), a stream's lifetime (it ends cleanly, and the client resumes with
Last-Event-ID), and the streams of a revoked key ending."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from qaas_client import Client
from service.auth import create_key, revoke_key
from service.database import transaction
from service.jobs import state
from service.settings import Settings
from tests.onnx_models import conv_classifier
from tests.service.conftest import LiveServer, serve
from tests.service.helpers import assert_error
from tests.sse import EventReader

pytestmark = pytest.mark.timeout(60)
RESULT = {"original": {"size_bytes": 100}, "quantized": {"size_bytes": 30}, "comparison": {"size_ratio": 0.3}}


@contextmanager
def _live(app_settings: Settings, **update: Any) -> Iterator[LiveServer]:
    quick = {"events_poll_s": 0.05, "events_progress_s": 0.3, "events_heartbeat_s": 0.3, "auth": "on"}
    yield from serve(app_settings.model_copy(update={**quick, **update}))


def _key(live: LiveServer, tenant: str) -> str:
    with transaction(live.state.session_factory) as session:
        return create_key(session, tenant).key


def _http(live: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=20, headers={"Authorization": f"Bearer {key}"})


def _queued_job(http: httpx.Client, tmp_path: Path) -> str:
    """A dynamic job (no dataset needed); no worker runs, so it stays queued until the test moves it."""
    path = conv_classifier(tmp_path / f"m{time.monotonic_ns()}.onnx")
    model = http.post("/v1/models", files={"file": ("m.onnx", path.read_bytes())})
    assert model.status_code == 201, model.text
    job = http.post("/v1/jobs", json={"model_id": model.json()["id"], "recipe": {"mode": "dynamic"}})
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    return job_id


@contextmanager
def _stream(http: httpx.Client, job_id: str, last_event_id: str | None = None) -> Iterator[EventReader]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        yield EventReader(response)


def _opened(stack: ExitStack, http: httpx.Client, job_id: str) -> EventReader:
    """Opens a stream (kept open by `stack`, and while the reader lives) and reads the state it starts with."""
    reader = stack.enter_context(_stream(http, job_id))
    first = [reader.next(), reader.next()]
    assert [e.event if e else None for e in first] == ["status", "progress"]
    return reader


def _refused(http: httpx.Client, job_id: str) -> httpx.Response:
    """A stream request that must be refused (read only then: a stream that opened would never end)."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 429, "the stream was opened"
        response.read()
    return response


def _ended_within(reader: EventReader, seconds: float) -> bool:
    """True when the server closes the stream within `seconds`, with nothing but heartbeats meanwhile."""
    deadline = time.monotonic() + seconds
    for line in reader.lines:
        assert not line or line.startswith(":"), f"an event where none was due: {line}"
        if time.monotonic() > deadline:
            return False
    return True


def _write(live: LiveServer, fn: Any) -> Any:
    with transaction(live.state.session_factory) as session:
        return fn(session)


def test_open_streams_are_capped_per_key_and_per_process(app_settings: Settings, tmp_path: Path) -> None:
    assert Settings.model_fields["events_max_per_key"].default == 10
    with _live(app_settings, events_max_per_process=12) as live, ExitStack() as stack:
        alice, bob = _http(live, _key(live, "alice")), _http(live, _key(live, "bob"))
        stack.enter_context(alice)
        stack.enter_context(bob)
        job, bobs_job = _queued_job(alice, tmp_path), _queued_job(bob, tmp_path)
        held = ExitStack()
        stack.enter_context(held)
        readers = [_opened(held, alice, job) for _ in range(10)]
        refused = _refused(alice, job)
        error = assert_error(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
        assert error["detail"]["scope"] == "key" and error["detail"]["retry_after_s"] > 0
        assert "QAAS_EVENTS_MAX_PER_KEY" in error["message"]
        # Another key is not held back by alice's streams, up to the process's cap (12).
        readers += [_opened(stack, bob, bobs_job) for _ in range(2)]
        error = assert_error(_refused(bob, bobs_job), 429, "rate_limited")
        assert error["detail"]["scope"] == "process"
        assert live.state.event_hub.open_streams == 12
        assert alice.get(f"/v1/jobs/{job}").status_code == 200  # other requests are not streams
        # Closed streams give their slots back.
        held.close()
        del readers[:10]
        deadline = time.monotonic() + 10
        while True:
            with bob.stream("GET", f"/v1/jobs/{bobs_job}/events") as answer:
                if answer.status_code == 200:
                    break
                assert answer.status_code == 429 and time.monotonic() < deadline, answer.read()
            time.sleep(0.05)


def test_a_stream_ends_after_its_lifetime_and_resumes_with_last_event_id(
    app_settings: Settings, tmp_path: Path
) -> None:
    with _live(app_settings, events_max_stream_s=0.5) as live:
        key = _key(live, "alice")
        with _http(live, key) as http:
            job_id = _queued_job(http, tmp_path)
            with _stream(http, job_id) as events:
                started = time.monotonic()
                status, progress = events.next(), events.next()
                assert status is not None and progress is not None and progress.event == "progress"
                assert _ended_within(events, 5), "the stream outlived QAAS_EVENTS_MAX_STREAM_S"
                assert time.monotonic() - started >= 0.4
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # ended early, not with the job
            # Resumed after what it had: nothing is repeated, and what happens next arrives.
            with _stream(http, job_id, last_event_id=progress.id) as events:
                _write(live, lambda s: state.claim(s, job_id, 60))
                running = events.next()
                assert running is not None and (running.event, running.data["status"]) == ("status", "running")

        # The qaas client follows a job across several such ends, each time from the last event it got.
        with _http(live, key) as http:
            job_id = _queued_job(http, tmp_path)
        asked: list[str | None] = []

        class Recording(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                if request.url.path.endswith("/events"):
                    asked.append(request.headers.get("last-event-id"))
                return super().handle_request(request)

        def worker() -> None:
            time.sleep(1.3)  # two lifetimes and more while queued
            attempt = _write(live, lambda s: state.claim(s, job_id, 60))
            time.sleep(0.7)
            _write(live, lambda s: state.succeed(s, job_id, attempt, RESULT))

        mover = threading.Thread(target=worker)
        with Client(live.url, key, transport=Recording(), sleep=lambda _s: time.sleep(0.05)) as client:
            job = client.get_job(job_id)
            mover.start()
            updates = [(u.status, u.stage) for u in job.updates()]
        mover.join()
        assert updates[0] == ("queued", "queued") and updates[-1] == ("succeeded", "done"), updates
        assert ("running", "validating") in updates
        assert len(asked) >= 3 and asked[0] is None and all(asked[1:]), asked


def test_the_streams_of_a_revoked_key_stop(app_settings: Settings, tmp_path: Path) -> None:
    with _live(app_settings, events_key_check_s=0.1) as live, ExitStack() as stack:
        alice_key = _key(live, "alice")
        alice, bob = _http(live, alice_key), _http(live, _key(live, "bob"))
        stack.enter_context(alice)
        stack.enter_context(bob)
        job, bobs_job = _queued_job(alice, tmp_path), _queued_job(bob, tmp_path)
        alices = stack.enter_context(_stream(alice, job))
        bobs = stack.enter_context(_stream(bob, bobs_job))
        for reader in (alices, bobs):
            assert [e.event for e in (reader.next(), reader.next()) if e] == ["status", "progress"]
        with transaction(live.state.session_factory) as session:
            revoke_key(session, alice_key[: len("qaas_") + 8])
        assert _ended_within(alices, 5), "a revoked key's stream stayed open"
        assert live.state.event_hub.key_checks >= 1
        # Bob's stream goes on: it still gets what happens to his job.
        _write(live, lambda s: state.claim(s, bobs_job, 60))
        moved = bobs.next()
        assert moved is not None and (moved.event, moved.data["status"]) == ("status", "running")
        assert_error(alice.get(f"/v1/jobs/{job}/events"), 401, "unauthorized")
