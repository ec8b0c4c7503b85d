"""Answers the real service gives rarely or slowly (503 while the broker is down, Retry-After as a
date, a connection refused), scripted so that every retry decision is visible."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from qaas_client import RateLimitedError, ServerError, UnavailableError
from tests.client.conftest import scripted

JOB = {"id": "j1", "status": "queued", "stage": "queued", "progress": 0.0, "recipe": {"mode": "dynamic"}}


def _error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": code, "message": f"{code} for now", "detail": {}}}
    return httpx.Response(status, json=body, headers=headers)


def test_job_creation_waits_out_a_503_and_retries_with_the_same_idempotency_key() -> None:
    keys: list[str] = []
    sleeps: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        return _error(503, "unavailable", "2") if len(keys) == 1 else httpx.Response(202, json=JOB)

    with scripted(answer, sleeps) as client:
        job = client.create_job("m1", recipe={"mode": "dynamic"})
    assert job.id == "j1"
    assert sleeps == [2.0]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]


def test_retry_after_as_an_http_date() -> None:
    sleeps: list[float] = []
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    answers = iter([_error(429, "rate_limited", when), httpx.Response(200, json=JOB)])
    with scripted(lambda _r: next(answers), sleeps) as client:
        client.get_job("j1")
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 30


def test_without_retry_after_it_backs_off_then_gives_up_with_the_typed_error() -> None:
    sleeps: list[float] = []
    with (
        scripted(lambda _r: _error(429, "rate_limited"), sleeps, max_retries=3) as client,
        pytest.raises(RateLimitedError) as limited,
    ):
        client.get_job("j1")
    assert sleeps == [0.5, 1.0, 2.0]
    assert limited.value.code == "rate_limited" and limited.value.message == "rate_limited for now"


def test_a_wait_longer_than_allowed_is_not_attempted() -> None:
    sleeps: list[float] = []
    client = scripted(lambda _r: _error(429, "rate_limited", "3600"), sleeps, max_wait_s=60)
    with client, pytest.raises(RateLimitedError):
        client.get_job("j1")
    assert sleeps == []


def test_other_errors_are_not_retried() -> None:
    calls: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return _error(500, "internal")

    with scripted(answer) as client, pytest.raises(ServerError) as failed:
        client.get_job("j1")
    assert len(calls) == 1 and failed.value.code == "internal" and failed.value.status == 500


def test_no_service_at_the_url_says_so() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    sleeps: list[float] = []
    with scripted(refuse, sleeps, max_retries=2) as client, pytest.raises(UnavailableError) as down:
        client.get_job("j1")
    assert down.value.code == "connection_error" and "QAAS_URL" in down.value.message
    assert len(sleeps) == 2
