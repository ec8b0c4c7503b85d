"""`make run`'s supervisor (`python -m service.run`): migrates, starts API and worker, restarts a
dead worker, and stops everything on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import clean_env, free_port

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
