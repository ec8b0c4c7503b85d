"""Property-based fuzzing of every operation in /openapi.json (schemathesis): whatever the input,
the API answers without a 5xx, and every error body has the contract's shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.app import create_app
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


APP = _App()
schema = schemathesis.openapi.from_dict(create_app(Settings(data_dir=Path("unused"))).openapi())
schema.app = APP


@pytest.fixture(scope="module", autouse=True)
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "var"
    data_dir.mkdir()
    # Small upload limits, so generated bodies can reach the 413 paths too.
    app_settings = Settings(data_dir=data_dir, max_model_bytes=1 << 20, max_dataset_bytes=1 << 20)
    upgrade(app_settings)
    APP.target = create_app(app_settings)  # kept: schemathesis shuts the lifespan down at exit
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


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_makes_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error, error_shape])
