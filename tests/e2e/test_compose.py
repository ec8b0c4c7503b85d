"""No Docker engine runs here, so check that compose cannot drift from the commands the tests start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from service.run import API, MIGRATE, WORKER
from tests.s3 import S3Server

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


def test_api_and_workers_share_no_volume_only_the_object_store() -> None:
    """What tests/e2e/test_scale_out.py proves with processes that share no disk, compose must set up:
    the same variables (tests.s3.S3Server.env), a bucket made before anything uses it, no shared volume."""
    services = _compose()["services"]
    assert {"minio", "create-bucket"} <= set(services)
    tested = set(S3Server(Path("."), 0).env("bucket"))
    minio_env = services["minio"]["environment"]
    bucket_env = services["create-bucket"]["environment"]
    for name in ("api", "worker", "migrate"):
        service = services[name]
        assert "volumes" not in service, f"{name} mounts {service.get('volumes')}"
        env = service["environment"]
        assert tested <= set(env), f"{name} lacks {tested - set(env)}"
        assert env["QAAS_S3_ENDPOINT_URL"] == "http://minio:9000"
        # A user create-bucket makes, limited to the bucket: never MinIO's root user.
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            bucket_env["AWS_ACCESS_KEY_ID"],
            bucket_env["AWS_SECRET_ACCESS_KEY"],
        )
        assert env["AWS_ACCESS_KEY_ID"] != minio_env["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] != minio_env["MINIO_ROOT_PASSWORD"]
        assert env["QAAS_STORAGE_URL"].startswith(f"s3://{bucket_env['QAAS_BUCKET']}/")
        assert "QAAS_STORAGE_DIR" not in env
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["create-bucket"]["restart"] == "no"
    assert "mc mb --ignore-existing" in " ".join(services["create-bucket"]["command"])
    assert (
        'mc admin policy attach qaas qaas-bucket --user "$$AWS_ACCESS_KEY_ID"'
        in services["create-bucket"]["command"][0]
    )
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert set(_compose()["volumes"]) == {"pgdata", "objects"}
