"""No Docker engine runs here, so check that compose cannot drift from the commands the tests start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from service.run import API, MIGRATE, WORKER

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _as_container_command(argv: list[str]) -> list[str]:
    return ["python", *argv[1:]]


def test_services_run_the_tested_entry_points() -> None:
    services = _compose()["services"]
    assert services["migrate"]["command"] == _as_container_command(MIGRATE)
    assert services["api"]["command"] == _as_container_command(API)
    assert services["worker"]["command"] == _as_container_command(WORKER)


def test_production_shape() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["QAAS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["QAAS_BROKER_URL"].startswith("redis://")
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        # API and every worker share one artifact volume.
        assert "artifacts:/data/storage" in services[name]["volumes"]
        assert env["QAAS_STORAGE_DIR"] == "/data/storage"
        # Scaling workers (`--scale worker=3`) needs no fixed names or host ports on them.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["environment"]["QAAS_HOST"] == "0.0.0.0"
    assert services["api"]["environment"]["QAAS_AUTH"] == "on"  # a shared deployment needs API keys


def test_dockerfile_is_one_slim_non_root_image() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "USER qaas" in dockerfile
    # The dependency layer comes before the source, so code changes reuse it.
    assert dockerfile.index("pip install") < dockerfile.index("COPY service")
    for path in ("service", "worker", "migrations", "alembic.ini"):
        assert f"COPY {path}" in dockerfile
