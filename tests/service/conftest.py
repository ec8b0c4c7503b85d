from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import redis_prefix


@pytest.fixture
def app_settings(db_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The two deployments the service supports: SQLite with the filesystem broker (embedded), and
    PostgreSQL with Redis as the broker (production), each test on a Redis key prefix of its own."""
    if db_settings.resolved_database_url.startswith("sqlite"):
        return db_settings
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = f"{redis_prefix()}{uuid.uuid4().hex[:8]}:"
    return db_settings.model_copy(update={"broker_url": redis_url, "broker_key_prefix": prefix})


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    """The real app on a real database and broker (see `app_settings`)."""
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as test_client:
        yield test_client
