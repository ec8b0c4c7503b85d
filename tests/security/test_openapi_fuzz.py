"""Property-based fuzzing of every operation in /openapi.json (schemathesis): whatever the input,
the API answers without a 5xx, every error body has the contract's shape, and every answer is one the
document promises (its status documented for the operation, its body valid against that status's
schema, its media type the documented one). Twice: with auth off, and with auth on and a valid key (so
the inputs reach the routes, not just the key check)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.auth import create_key
from service.database import make_engine, make_session_factory, transaction
from service.migrate import upgrade
from service.settings import Settings

MAX_EXAMPLES = 25


class _App:
    """The ASGI app under test, built by the module fixture on a migrated database. The schema is
    read from an app that is never started, at import, where pytest parametrizes the operations."""

    target: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.target is not None, "the fuzz_app fixture builds the app"
        await self.target(scope, receive, send)


APP, APP_WITH_AUTH = _App(), _App()
SPEC = create_app(Settings(data_dir=Path("unused"))).openapi()
schema = schemathesis.openapi.from_dict(SPEC)
schema.app = APP
schema_with_auth = schemathesis.openapi.from_dict(SPEC)
schema_with_auth.app = APP_WITH_AUTH
KEY: dict[str, str] = {}


def _fuzz_settings(tmp_path_factory: pytest.TempPathFactory, name: str, **update: Any) -> Settings:
    data_dir: Path = tmp_path_factory.mktemp(name) / "var"
    data_dir.mkdir()
    # Small upload limits, so generated bodies can reach the 413 paths too.
    app_settings = Settings(data_dir=data_dir, max_model_bytes=1 << 20, max_dataset_bytes=1 << 20, **update)
    upgrade(app_settings)
    return app_settings


@pytest.fixture(scope="module", autouse=True)
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    APP.target = create_app(_fuzz_settings(tmp_path_factory, "fuzz"))  # kept: schemathesis shuts the lifespan down
    with_auth = _fuzz_settings(tmp_path_factory, "fuzz-auth", auth="on")
    engine = make_engine(with_auth)
    with transaction(make_session_factory(engine)) as session:
        KEY["Authorization"] = f"Bearer {create_key(session, 'fuzz').key}"
    engine.dispose()
    APP_WITH_AUTH.target = create_app(with_auth)
    yield


def error_shape(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "detail"}, error
    assert isinstance(error["code"], str) and error["code"].replace("_", "").isalpha(), error
    assert error["code"] == error["code"].lower(), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"], error
    assert isinstance(error["detail"], dict), error


FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


CHECKS = [
    not_a_server_error,
    error_shape,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
]


@schema.parametrize()
@FUZZ
def test_no_input_makes_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


@schema_with_auth.parametrize()
@FUZZ
def test_no_input_makes_a_server_error_with_auth_on(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=KEY, checks=CHECKS)
