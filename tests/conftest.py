"""Shared fixtures: settings per test, a real database per run (SQLite and PostgreSQL), a Redis key
space per run, and the app over a real database built by the migrations."""

from __future__ import annotations

import os

# NumPy's BLAS threads fight the other test process (`make test` runs two on two cores) and the ONNX Runtime
# sessions for the same cores: the fixtures' fitted heads (tests/ocr_models.softmax_regression) took 5x longer
# with them. Set before anything imports NumPy; the processes the e2e tests start inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory
from service.migrate import upgrade
from service.settings import Settings
from tests.s3 import S3Server, running_server

TEST_DATABASE_URL = os.environ.get("QAAS_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TEST_REDIS_URL = os.environ.get("QAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("QAAS_REQUIRE_SERVICES") == "1"
RUN_ID = uuid.uuid4().hex[:12]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_qaas_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any QAAS_ setting, plus `overrides`: for child processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env.update(overrides)
    return env


def unavailable(what: str, exc: Exception | str, fix: str = "start it or set its QAAS_TEST_* URL") -> NoReturn:
    """The one way a test skips: for a missing service or tool, and a failure when
    QAAS_REQUIRE_SERVICES=1 (as in CI), so that nothing CI runs can vanish silently."""
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, Exception) else exc
    message = f"{what} unavailable ({reason}); {fix}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (QAAS_REQUIRE_SERVICES=1)")
    pytest.skip(message)


# Tests that need the real PostgreSQL or Redis carry the `services` marker (`-m "not services"`
# runs the rest). Fixtures named here mark every test that uses them, directly or through other
# fixtures; the parameters that reach them at run time (`db_settings`, `deployment`) are marked
# where they are declared, and `_services_marker_is_honest` fails a test that reached one unmarked.
SERVICE_FIXTURES = frozenset({"postgres_url", "redis_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


def unmarked_service_use(reached: set[str], marked: bool) -> str | None:
    """Why a test that reached these fixtures breaks the marker's promise, or None."""
    used = sorted(SERVICE_FIXTURES & reached)
    if not used or marked:
        return None
    return (
        f"this test reached {', '.join(used)} at run time without the `services` marker, so "
        '`-m "not services"` would still need PostgreSQL/Redis: mark the parameter or fixture that '
        "asks for it (pytest.param(..., marks=pytest.mark.services))"
    )


@pytest.fixture(autouse=True)
def _services_marker_is_honest(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fixtures reached through `request.getfixturevalue` (deployments picked by a parameter) escape
    the marking above; after the test, every fixture it reached is known, so an unmarked one fails here."""
    yield
    problem = unmarked_service_use(set(request.fixturenames), request.node.get_closest_marker("services") is not None)
    if problem:
        pytest.fail(problem)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this run's own on the real PostgreSQL, dropped at the end."""
    admin_url = make_url(TEST_DATABASE_URL)
    name = f"qaas_test_{RUN_ID}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        unavailable("PostgreSQL", exc)
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The real Redis; this run's keys carry the prefix `qaas-test-<run>:` and are deleted after."""
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        unavailable("Redis", exc)
    yield TEST_REDIS_URL
    for key in client.scan_iter(match=f"{redis_prefix()}*"):
        client.delete(key)
    client.close()


def redis_prefix() -> str:
    return f"qaas-test-{RUN_ID}:"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "var"
    path.mkdir()
    return path


@pytest.fixture
def sqlite_settings(data_dir: Path) -> Settings:
    settings = Settings(data_dir=data_dir)
    upgrade(settings)
    return settings


def fresh_database(postgres_url: str) -> Iterator[str]:
    """A database of the caller's own on the real PostgreSQL, dropped after."""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"qaas_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_settings(data_dir: Path, postgres_url: str) -> Iterator[Settings]:
    """Settings on a fresh schema: each test gets its own PostgreSQL schema via a new database."""
    for url in fresh_database(postgres_url):
        settings = Settings(data_dir=data_dir, database_url=url)
        upgrade(settings)
        yield settings


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def db_settings(request: pytest.FixtureRequest) -> Settings:
    """The same test on both databases the service supports."""
    name = "sqlite_settings" if request.param == "sqlite" else "postgres_settings"
    settings: Settings = request.getfixturevalue(name)
    return settings


@pytest.fixture
def session_factory(db_settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the migrated test database (both backends); the engine is disposed after."""
    engine = make_engine(db_settings)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server, a process of its own on a loopback port, for the whole run."""
    yield from running_server(tmp_path_factory.mktemp("s3"), free_port())


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket, and this process's environment set to use it (QAAS_ and AWS_ variables)."""
    env = s3_server.env(s3_server.new_bucket())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
