from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@pytest.fixture
def client(db_settings: Settings) -> Iterator[TestClient]:
    """The real app on a real database (SQLite and PostgreSQL) and the filesystem broker."""
    with TestClient(create_app(db_settings), raise_server_exceptions=False) as test_client:
        yield test_client
