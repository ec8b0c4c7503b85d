"""What the README says about `make test` without PostgreSQL and Redis: their tests skip with the
reason, and `QAAS_REQUIRE_SERVICES=1` (what CI sets) turns those skips into failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One test that needs PostgreSQL, one that needs Redis (the in-process API on the production pair).
NEEDS_SERVICES = [
    "tests/service/test_job_state.py::test_a_job_is_claimed_once[postgresql]",
    "tests/service/test_jobs_api.py::test_the_job_message_reaches_the_broker[postgresql]",
]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens on it once the socket is closed


def _pytest(require: bool) -> subprocess.CompletedProcess[str]:
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env["QAAS_TEST_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    env["QAAS_TEST_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    if require:
        env["QAAS_REQUIRE_SERVICES"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", *NEEDS_SERVICES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_without_the_services_their_tests_skip_with_the_reason() -> None:
    done = _pytest(require=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 skipped" in done.stdout, done.stdout[-3000:]
    assert "PostgreSQL unavailable" in done.stdout


def test_qaas_require_services_turns_those_skips_into_failures() -> None:
    done = _pytest(require=True)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "2 failed" in done.stdout or "1 failed, 1 error" in done.stdout or "2 error" in done.stdout, done.stdout[
        -3000:
    ]
    assert "QAAS_REQUIRE_SERVICES=1" in done.stdout
