"""`make run`'s supervisor (`python -m service.run`): migrates, starts API and worker, restarts a
dead worker, and stops everything on Ctrl-C."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import fresh_database, redis_prefix
from tests.e2e.conftest import clean_env, free_port, upload, wait_for_job
from tests.onnx_models import matmul_mlp

pytestmark = pytest.mark.e2e


def _worker_pids(supervisor: psutil.Process) -> list[int]:
    pids = []
    for child in supervisor.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "worker" in child.cmdline():
                pids.append(child.pid)
        except psutil.Error:  # exited between listing and asking
            continue
    return pids


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_supervisor_restarts_the_worker_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(QAAS_DATA_DIR=str(tmp_path / "var"), QAAS_PORT=str(port))
    with (tmp_path / "run.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    supervisor = psutil.Process(proc.pid)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 90, "the API to be ready")
        assert (tmp_path / "var" / "qaas.db").exists()  # migrated SQLite under the data dir
        output = (tmp_path / "run.log").read_text()
        assert f"http://127.0.0.1:{port}/docs" in output

        _wait(lambda: len(_worker_pids(supervisor)) == 1, 30, "the worker")
        [first] = _worker_pids(supervisor)
        psutil.Process(first).kill()
        _wait(lambda: _worker_pids(supervisor) not in ([], [first]), 30, "a restarted worker")
        assert "restarting it" in (tmp_path / "run.log").read_text()

        children = supervisor.children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        assert "QaaS stopped." in (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            for child in supervisor.children(recursive=True):
                child.kill()
            proc.kill()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_with_postgresql_and_redis_set_make_run_uses_them(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    """The README: with QAAS_DATABASE_URL and QAAS_BROKER_URL set, `make run` uses them instead of
    SQLite and the filesystem broker. A job runs through them, and nothing embedded is created."""
    data_dir = tmp_path / "var"
    for database_url in fresh_database(postgres_url):
        port = free_port()
        env = clean_env(
            QAAS_DATA_DIR=str(data_dir),
            QAAS_PORT=str(port),
            QAAS_DATABASE_URL=database_url,
            QAAS_BROKER_URL=redis_url,
            QAAS_BROKER_KEY_PREFIX=f"{redis_prefix()}make-run:",
        )
        with (tmp_path / "run.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.run"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        supervisor = psutil.Process(proc.pid)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait(functools.partial(_ready, base), 90, "the API to be ready")
            assert "external database and broker" in (tmp_path / "run.log").read_text()
            with httpx.Client(base_url=base, timeout=60) as http:
                model_id = upload(http, "/v1/models", "mlp.onnx", matmul_mlp(tmp_path / "mlp.onnx").read_bytes())
                body = {"model_id": model_id, "recipe": {"mode": "dynamic"}, "evaluation": {"latency_runs": 3}}
                created = http.post("/v1/jobs", json=body)
                assert created.status_code == 202, created.text
                job, _ = wait_for_job(http, created.json()["id"])
            assert job["status"] == "succeeded", (job["error"], (tmp_path / "run.log").read_text()[-3000:])
            engine = create_engine(database_url)
            try:
                with engine.connect() as conn:
                    stored = conn.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job["id"]}).scalar()
            finally:
                engine.dispose()
            assert stored == "succeeded"  # the job lives in PostgreSQL
            assert not (data_dir / "qaas.db").exists() and not (data_dir / "broker").exists()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=40) == 0
        finally:
            if proc.poll() is None:
                for child in supervisor.children(recursive=True):
                    child.kill()
                proc.kill()
