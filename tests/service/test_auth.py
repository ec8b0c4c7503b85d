"""The per-address limit on requests without a valid key: a flood of made-up keys costs no query once over
it, yet never locks out a valid key from the same address; /metrics counts the same way; and the API warns
at start when every client may share one address (auth on, no trusted proxy)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import event

from service.app import create_app
from service.auth import create_key, revoke_key
from service.database import transaction
from service.settings import Settings
from tests.service.helpers import assert_error

MADE_UP = "qaas_0badc0de_" + "x" * 43  # well formed: below the limit, it costs a database lookup
OPERATOR = "operator-secret-1234"


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _key(api: TestClient, tenant: str) -> str:
    with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
        return create_key(session, tenant).key


@contextmanager
def _key_lookups(api: TestClient) -> Iterator[list[str]]:
    """The statements on the api_keys table while inside."""
    found: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "api_keys" in statement:
            found.append(statement)

    engine = api.app.state.engine  # type: ignore[attr-defined]
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_flood_of_made_up_keys_does_not_lock_out_a_valid_key(auth_settings: Settings) -> None:
    settings = auth_settings.model_copy(update={"auth_failures_per_minute": 3})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        alice, carol = _key(api, "alice"), _key(api, "carol")
        assert api.get("/v1/models", headers=_as(alice)).status_code == 200
        assert api.get("/v1/models", headers=_as(carol)).status_code == 200
        statuses = [api.get("/v1/models", headers=_as(MADE_UP)).status_code for _ in range(3)]
        assert statuses == [401, 401, 401]
        with _key_lookups(api) as lookups:
            for _ in range(20):  # over the limit: refused without a query
                assert_error(api.get("/v1/models", headers=_as(MADE_UP)), 429, "rate_limited")
            assert_error(api.get("/v1/models"), 429, "rate_limited")
            assert lookups == []
            # A key this process found valid is still served from that address, and still checked:
            served = api.get("/v1/models", headers=_as(alice))
            assert served.status_code == 200, served.text
            assert len(lookups) == 1
            # so a key revoked meanwhile is refused at once, and counts as a failure from then on.
            with transaction(api.app.state.session_factory) as session:  # type: ignore[attr-defined]
                revoke_key(session, carol[: len("qaas_") + 8])
            assert_error(api.get("/v1/models", headers=_as(carol)), 401, "unauthorized")
            looked_up = len(lookups)
            assert_error(api.get("/v1/models", headers=_as(carol)), 429, "rate_limited")
            assert_error(api.get("/v1/models", headers=_as(MADE_UP)), 429, "rate_limited")
            assert len(lookups) == looked_up
        # A valid key this process has not seen yet waits with the rest of the address (telling it from a
        # made-up one would take the lookup the limit saves); from another address it is served.
        bob = _key(api, "bob")
        assert_error(api.get("/v1/models", headers=_as(bob)), 429, "rate_limited")
        other = TestClient(api.app, raise_server_exceptions=False, client=("10.0.0.9", 40000))
        assert other.get("/v1/models", headers=_as(bob)).status_code == 200
        assert api.get("/v1/models", headers=_as(bob)).status_code == 200  # and then from the flooded one too


def test_metrics_count_wrong_tokens_against_the_address(auth_settings: Settings) -> None:
    settings = auth_settings.model_copy(update={"auth_failures_per_minute": 3, "metrics_token": SecretStr(OPERATOR)})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        alice = _key(api, "alice")
        assert api.get("/v1/models", headers=_as(alice)).status_code == 200
        with _key_lookups(api) as lookups:
            for _ in range(3):
                assert_error(api.get("/metrics", headers=_as(MADE_UP)), 401, "unauthorized")
            assert len(lookups) == 3
            limited = api.get("/metrics", headers=_as(MADE_UP))
            error = assert_error(limited, 429, "rate_limited")
            assert int(limited.headers["retry-after"]) >= 1 and error["detail"]["scope"] == "address"
            assert_error(api.get("/metrics", headers=_as("not-even-a-key")), 429, "rate_limited")
            assert len(lookups) == 3  # no query once over the limit
            # The operator token, and a tenant's key already seen, are never taken for made-up ones.
            assert api.get("/metrics", headers=_as(OPERATOR)).status_code == 200
            assert_error(api.get("/metrics", headers=_as(alice)), 403, "forbidden")
            assert api.get("/v1/models", headers=_as(alice)).status_code == 200
        # The same limit as the API's: /metrics failures hold back made-up keys elsewhere too.
        assert_error(api.get("/v1/jobs", headers=_as(MADE_UP)), 429, "rate_limited")


@pytest.mark.parametrize(
    ("auth", "host", "proxies", "warned"),
    [
        ("on", "0.0.0.0", None, True),
        ("on", "0.0.0.0", "10.0.0.2", False),
        ("on", "127.0.0.1", None, False),
        ("off", "0.0.0.0", None, False),
    ],
)
def test_start_up_warns_when_no_proxy_is_trusted(
    sqlite_settings: Settings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    auth: str,
    host: str,
    proxies: str | None,
    warned: bool,
) -> None:
    if proxies is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", proxies)
    settings = sqlite_settings.model_copy(update={"auth": auth, "host": host, "allow_insecure": True})
    caplog.set_level(logging.WARNING, logger="service")
    with TestClient(create_app(settings)):
        pass
    said = [r.getMessage() for r in caplog.records if "FORWARDED_ALLOW_IPS" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "QAAS_AUTH_FAILURES_PER_MINUTE" in said[0] and "0.0.0.0" in said[0]
