"""The job process holds nothing worth stealing and leaves nothing behind: a minimal environment
with TMPDIR inside its work dir, only allow-listed regular files taken back as artifacts, SIGTERM
an orderly exit, and a sweep that clears orphaned scratch. The runner is the real one; the job
process's command is swapped for a script that plays a hostile or slow job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory, transaction
from service.jobs import state
from service.settings import Settings
from service.storage import LocalStorage
from service.tables import Artifact, Job
from tests.service.test_job_state import _job, store_job_model
from worker.reaper import clean_scratch
from worker.runner import JobRunner

Factory = sessionmaker[Session]


@pytest.fixture
def settings(sqlite_settings: Settings) -> Settings:
    return sqlite_settings


@pytest.fixture
def factory(settings: Settings) -> Iterator[Factory]:
    engine = make_engine(settings)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def runner(settings: Settings, factory: Factory) -> JobRunner:
    storage = LocalStorage(settings.resolved_storage_dir)
    store_job_model(storage)
    return JobRunner(settings, factory, storage)


def job_process_is(monkeypatch: pytest.MonkeyPatch, code: str, *args: str) -> None:
    """The runner starts `python -c code WORKDIR *args` instead of `python -m worker.job_process WORKDIR`,
    with everything else (environment, limits, process group) as it sets it."""
    real = subprocess.Popen

    def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return real([sys.executable, "-c", code, argv[-1], *args], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)


def job(factory: Factory, job_id: str) -> Job:
    with factory() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


DUMP_ENVIRONMENT = """
import json, os, pathlib, sys
pathlib.Path(sys.argv[2]).write_text(json.dumps(dict(os.environ)))
error = {"code": "internal", "message": "dumped", "detail": {}}
(pathlib.Path(sys.argv[1]) / "outcome.json").write_text(json.dumps({"status": "failed", "error": error}))
"""


def test_the_job_process_gets_no_secrets(
    runner: JobRunner, factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QAAS_DATABASE_URL", "postgresql+psycopg://qaas:hunter2@db:5432/qaas")
    monkeypatch.setenv("QAAS_BROKER_URL", "redis://:hunter2@redis:6379/0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    dump = tmp_path / "environment.json"
    job_process_is(monkeypatch, DUMP_ENVIRONMENT, str(dump))
    job_id = _job(factory)
    runner.run(job_id)
    env = json.loads(dump.read_text())
    assert "QAAS_DATABASE_URL" not in env and "QAAS_BROKER_URL" not in env
    assert not [name for name in env if name.startswith("QAAS_")]
    assert "hunter2" not in json.dumps(env)
    assert Path(env["TMPDIR"]).is_relative_to(runner.settings.resolved_work_dir / job_id)
    assert Path(env["HOME"]).is_relative_to(runner.settings.resolved_work_dir / job_id)  # not the worker's home
    assert env["PATH"]
    assert job(factory, job_id).error == {"code": "internal", "message": "dumped", "detail": {}}


HAND_BACK = """
import json, os, pathlib, sys
workdir, plan = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
out = workdir / "artifacts"
out.mkdir()
(out / "quantized.onnx").write_bytes(b"model")
(out / "report.json").write_text("{}")
artifacts = {"quantized.onnx": str(out / "quantized.onnx"), "report.json": str(out / "report.json")}
secret = pathlib.Path(plan["secret"])
if plan["case"] == "a file outside the work dir":
    artifacts["quantized.onnx"] = str(secret)
elif plan["case"] == "a symbolic link out of the work dir":
    (out / "quantized.onnx").unlink()
    (out / "quantized.onnx").symlink_to(secret)
elif plan["case"] == "a hard link to a file outside":
    (out / "quantized.onnx").unlink()
    os.link(secret, out / "quantized.onnx")
elif plan["case"] == "a name off the allow-list":
    (out / "index.html").write_text("<script>alert(1)</script>")
    artifacts["index.html"] = str(out / "index.html")
listed = [{"name": n, "path": p, "media_type": "text/html"} for n, p in artifacts.items()]
result = {"original": {"size_bytes": 5}, "quantized": {"size_bytes": 5}, "comparison": {}}
outcome = {"status": "succeeded", "result": result, "artifacts": listed}
(workdir / "outcome.json").write_text(json.dumps(outcome))
"""


@pytest.mark.parametrize(
    "case",
    [
        "a file outside the work dir",
        "a symbolic link out of the work dir",
        "a hard link to a file outside",
        "a name off the allow-list",
    ],
)
def test_the_runner_refuses_artifacts_it_did_not_ask_for(
    runner: JobRunner, factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the worker's secret")
    job_process_is(monkeypatch, HAND_BACK, json.dumps({"case": case, "secret": str(secret)}))
    job_id = _job(factory)
    runner.run(job_id)
    ended = job(factory, job_id)
    assert ended.status == "failed" and ended.error is not None and ended.error["code"] == "internal", ended.error
    assert secret.read_text() == "the worker's secret"
    assert not (runner.settings.resolved_storage_dir / f"jobs/{job_id}").exists()


def test_the_runner_sets_the_media_types(
    runner: JobRunner, factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_process_is(monkeypatch, HAND_BACK, json.dumps({"case": "well behaved", "secret": str(tmp_path / "x")}))
    job_id = _job(factory)
    runner.run(job_id)
    assert job(factory, job_id).status == "succeeded"
    with factory() as session:
        types = dict(session.execute(select(Artifact.name, Artifact.media_type)).tuples().all())
    assert types == {"quantized.onnx": "application/octet-stream", "report.json": "application/json"}


SLOW_JOB = """
import pathlib, sys, tempfile, time
import worker.job_process as job_process
marker, cleaned = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])

def run(job, workdir, report):
    try:
        # What quant_pre_process does with model-sized intermediate files.
        with tempfile.TemporaryDirectory(prefix="qaas-cancel-test-") as tmp:
            (pathlib.Path(tmp) / "model-sized.bin").write_bytes(bytes(1 << 20))
            marker.write_text(tmp)
            report(job_process.Stage.CALIBRATING, 0.5)
            time.sleep(600)
    finally:
        cleaned.write_text("the job process cleaned up")

job_process.run = run
sys.exit(job_process.main(pathlib.Path(sys.argv[1])))
"""


def test_a_cancelled_job_leaves_nothing_behind(
    runner: JobRunner, factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker, cleaned = tmp_path / "temporary-dir.txt", tmp_path / "cleaned.txt"
    job_process_is(monkeypatch, SLOW_JOB, str(marker), str(cleaned))
    job_id = _job(factory)
    thread = threading.Thread(target=runner.run, args=(job_id,))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the job process never started its work"
    finally:
        with transaction(factory) as session:
            row = session.get(Job, job_id)
            assert row is not None
            state.request_cancel(session, row)
        thread.join(timeout=60)
    assert job(factory, job_id).status == "cancelled"
    temporary = Path(marker.read_text())
    assert temporary.is_relative_to(runner.settings.resolved_work_dir), "TMPDIR was not inside the work dir"
    assert not temporary.exists()
    assert cleaned.read_text() == "the job process cleaned up"  # SIGTERM ran its `finally`
    assert not (runner.settings.resolved_work_dir / job_id).exists()
    for system_tmp in {Path(tempfile.gettempdir()), Path("/tmp")}:
        assert not list(system_tmp.glob("qaas-cancel-test-*"))


def test_the_sweep_clears_orphaned_scratch(runner: JobRunner, factory: Factory) -> None:
    """A SIGKILLed attempt's folder (and its TMPDIR) goes once a newer attempt runs, even while the job
    runs on; so does anything loose in the work dir. The running attempt's folder stays."""
    work = runner.settings.resolved_work_dir
    job_id = _job(factory)
    with transaction(factory) as session:
        assert state.claim(session, job_id, 60) == 1
        session.execute(update(Job).where(Job.id == job_id).values(attempts=2))
    (work / job_id / "1" / "tmp").mkdir(parents=True)
    (work / job_id / "1" / "tmp" / "pre.quant.onnx").write_bytes(bytes(1000))
    (work / job_id / "2").mkdir()
    (work / "tmpab12cd.onnx").write_bytes(bytes(1000))
    clean_scratch(factory, work)
    assert sorted(os.listdir(work)) == [job_id]
    assert sorted(os.listdir(work / job_id)) == ["2"]
