"""Hostile-input tests over HTTP against real processes (uvicorn + a Celery worker).

Each module starts one embedded deployment laid out as

    root/var       QAAS_DATA_DIR: the only folder the service may write
    root/tmp       TMPDIR of the API and the worker (where Starlette spools upload parts)
    root/outside   a canary folder next to the data dir that hostile names aim at

and every test ends by checking that the canary folder is untouched, nothing appeared beside the
data dir, no upload was left staged, the API holds no spooled file open, /healthz answers and
(where it matters) a normal job still completes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.e2e.conftest import Deployment, deploy, wait_for_job
from tests.onnx_models import conv_classifier
from tests.service.helpers import npz_bytes

CANARY_TEXT = b"canary: nothing may read or write me\n"


@pytest.fixture
def app_settings(sqlite_settings: Settings) -> Settings:
    """The settings of `client`; a module overrides this fixture for another database."""
    return sqlite_settings


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    """The real app in this process (no server, no worker) on a migrated database."""
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as test_client:
        yield test_client


@dataclass
class Hostile:
    """A deployment plus the folders the tests watch around it."""

    dep: Deployment
    root: Path
    outside: Path
    tmpdir: Path

    @property
    def canary(self) -> Path:
        return self.outside / "canary.txt"

    def client(self) -> httpx.Client:
        return self.dep.client()

    def tree(self) -> dict[str, str]:
        """Every path under root but the data dir and the logs, with a digest of each file. The worker's
        own multiprocessing folder (`tmp/pymp-<8 chars>`, empty, made by Celery's pool as it starts,
        which may be after the first snapshot) is left out too."""
        seen: dict[str, str] = {}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if rel.parts[0] in ("var", "logs") or _pool_folder(rel, path):
                continue
            seen[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        return seen

    def api_process(self) -> psutil.Process:
        return psutil.Process(self.dep.procs["api"].pid)


def _pool_folder(rel: Path, path: Path) -> bool:
    return (
        len(rel.parts) == 2
        and rel.parts[0] == "tmp"
        and re.fullmatch(r"pymp-[a-z0-9_]{8}", rel.parts[1]) is not None
        and path.is_dir()
        and not any(path.iterdir())
    )


def start(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp(name)
    outside = root / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_bytes(CANARY_TEXT)
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    for dep in deploy(name, root, TMPDIR=str(tmpdir), **env):
        yield Hostile(dep, root, outside, tmpdir)


def assert_contained(hostile: Hostile, before: dict[str, str]) -> None:
    """Nothing read-modified or created outside the data dir, nothing left staged or spooled."""
    assert hostile.canary.read_bytes() == CANARY_TEXT
    assert hostile.tree() == before, "files appeared or changed outside the data dir"
    staging = hostile.dep.data_dir / "staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    # FastAPI closes a request's spooled parts just after the answer is sent: give it a moment.
    deadline = time.monotonic() + 5
    while True:
        spooled = [
            p for p in open_paths(hostile.dep.procs["api"].pid) if p.startswith(str(hostile.tmpdir)) or "/staging/" in p
        ]
        if not spooled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not spooled, f"the API still holds upload files open: {spooled}"


def open_paths(pid: int) -> list[str]:
    """What a process's descriptors point at, deleted files included (psutil skips those)."""
    paths = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            paths.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return paths


class PeakMemory:
    """How far a process's resident memory peaks above where it stood as the `with` block began
    (`growth`, bytes). The kernel's peak (VmHWM) is reset on entry through /proc/<pid>/clear_refs, so
    an earlier test's peak cannot hide this one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.growth = 0

    def _status(self, field: str) -> int:
        line = next(x for x in Path(f"/proc/{self.pid}/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024  # kB

    def __enter__(self) -> PeakMemory:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.growth = self._status("VmHWM") - self.start


def assert_serving(hostile: Hostile) -> None:
    for name, proc in hostile.dep.procs.items():
        assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{hostile.dep.log_tail()}"
    response = httpx.get(f"{hostile.dep.base_url}/healthz", timeout=10)
    assert response.status_code == 200, response.text


def normal_job(hostile: Hostile, tmp_path: Path, timeout: float = 120) -> dict[str, Any]:
    """Upload a tiny classifier and data, quantize it, and insist that the job succeeds."""
    model_path = conv_classifier(tmp_path / "normal" / "classifier.onnx")
    samples = np.random.default_rng(0).random((4, 1, 3, 8, 8), dtype=np.float32)
    with hostile.client() as http:
        model = http.post("/v1/models", files={"file": ("classifier.onnx", model_path.read_bytes())})
        assert model.status_code == 201, model.text
        data = http.post("/v1/datasets", files={"file": ("calib.npz", npz_bytes(input=samples))})
        assert data.status_code == 201, data.text
        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model.json()["id"],
                "calibration_dataset_id": data.json()["id"],
                "recipe": {"mode": "static", "calibration_method": "minmax"},
                "evaluation": {"latency_runs": 3, "warmup_runs": 1},
            },
        )
        assert created.status_code == 202, created.text
        job, _ = wait_for_job(http, created.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", (job["error"], hostile.dep.log_tail())
    return job
