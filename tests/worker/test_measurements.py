"""The worker's side of measurements on other classes (worker/measurements.py): the sweep asks again for those
whose worker or message was lost, a measurement whose inputs are gone is recorded as failed rather than
left pending, and the sweep leaves a running measurement's scratch alone but clears a killed one's."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory, transaction
from service.jobs import measurements
from service.jobs.measurements import Due
from service.queue import class_queue
from service.settings import Settings
from service.storage import LocalStorage
from tests.security.test_job_sandbox import job_process_is
from tests.security.test_job_user import require_job_user
from tests.service.test_job_measurements import AMX, AVX2, entries, result, succeeded
from worker.inputs import InputCache
from worker.measurements import MEASUREMENTS_DIR, Measurer
from worker.reaper import sweep

Factory = sessionmaker[Session]


@pytest.fixture
def settings(sqlite_settings: Settings) -> Settings:
    return sqlite_settings.model_copy(update={"queued_resend_s": 600.0})


@pytest.fixture
def factory(settings: Settings) -> Iterator[Factory]:
    engine = make_engine(settings)
    yield make_session_factory(engine)
    engine.dispose()


def test_the_sweep_asks_for_the_measurements_of_a_job_whose_worker_died_after_it(
    settings: Settings, factory: Factory
) -> None:
    job_id = succeeded(factory, result(), [AVX2, AMX], [class_queue(AVX2), class_queue(AMX)])
    asked: list[Due] = []
    done = sweep(factory, [].append, settings, send_measurement=asked.append)
    assert done["measurements"] == [f"{job_id}/{AMX}"] and asked == [Due(job_id, AMX, class_queue(AMX))]
    assert sweep(factory, [].append, settings, send_measurement=asked.append)["measurements"] == []  # just asked
    assert [e.status for e in entries(factory, job_id)] == ["measured", "pending"]

    def broker_down(_: Due) -> None:
        raise ConnectionError("broker down")

    other = succeeded(factory, result(), [AVX2, AMX], [class_queue(AVX2), class_queue(AMX)])
    assert sweep(factory, [].append, settings, send_measurement=broker_down)["measurements"] == []
    assert entries(factory, other)[1].requests == 1  # counted: asked again after QAAS_QUEUED_RESEND_S


def test_a_measurement_whose_inputs_are_gone_is_recorded_failed(settings: Settings, factory: Factory) -> None:
    job_id = succeeded(factory, result(), [AVX2, AMX], [class_queue(AVX2), class_queue(AMX)])
    with transaction(factory) as session:
        measurements.ask(session, job_id, resend_after_s=None, max_requests=3)
    storage = LocalStorage(settings.resolved_storage_dir)  # the job's model was never stored
    Measurer(settings, factory, InputCache(storage, settings.cache_dir, 1 << 30)).measure(job_id, AMX)
    amx = entries(factory, job_id)[1]
    assert amx.status == "failed" and amx.error is not None and amx.error.code == "input_missing"
    assert amx.requests == 1
    assert not any((settings.resolved_work_dir / MEASUREMENTS_DIR).iterdir())  # its scratch is gone
    Measurer(settings, factory, InputCache(storage, settings.cache_dir, 1 << 30)).measure(job_id, AMX)  # a duplicate
    assert entries(factory, job_id)[1] == amx


def test_the_sweep_leaves_a_running_measurements_scratch_and_clears_a_killed_ones(
    settings: Settings, factory: Factory
) -> None:
    folder = settings.resolved_work_dir / MEASUREMENTS_DIR
    running, killed = folder / "job-a-1234", folder / "job-b-5678"
    for path in (running, killed):
        (path / "inputs").mkdir(parents=True)
    old = time.time() - 2 * settings.job_timeout_s - 3600
    os.utime(killed, (old, old))
    unknown = settings.resolved_work_dir / "not-a-job"
    unknown.mkdir()
    sweep(factory, [].append, settings)
    assert running.is_dir() and not killed.exists() and not unknown.exists()
    assert Path(folder).is_dir()


# A hostile measurement: it says which uid it ran as, and first tries to hand the worker another file.
WHO_AM_I = """
import json, os, pathlib, sys
workdir = pathlib.Path(sys.argv[1])
if sys.argv[2] == "link":
    os.symlink("/etc/hostname", workdir / "measured.json")
else:
    error = {"code": "uid", "message": str(os.getuid()), "detail": {"home": os.environ["HOME"]}}
    (workdir / "measured.json").write_text(json.dumps({"target": "edge", "status": "failed", "error": error}))
"""


@pytest.fixture
def passable_data_dir() -> Iterator[Path]:
    """A data dir every uid may pass through (pytest's tmp_path is 0700: there a job runs as the worker)."""
    root = Path(tempfile.mkdtemp(prefix="qaas-measure-user-", dir="/tmp"))
    root.chmod(0o711)
    yield root / "var"
    shutil.rmtree(root, ignore_errors=True)


def test_a_measurement_runs_under_a_uid_of_its_own_and_hands_back_no_other_file(
    passable_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_job_user()
    settings = Settings(data_dir=passable_data_dir)
    engine = make_engine(settings)
    measurer = Measurer(
        settings,
        make_session_factory(engine),
        InputCache(LocalStorage(settings.resolved_storage_dir), settings.cache_dir, 1 << 30),
    )
    try:
        for mode in ("uid", "link"):
            workdir = settings.resolved_work_dir / MEASUREMENTS_DIR / f"job-{mode}"
            workdir.mkdir(parents=True)
            job_process_is(monkeypatch, WHO_AM_I, mode)
            measured = measurer._run_child(workdir, "edge")
            assert measured.error is not None
            if mode == "uid":  # a uid of the range, not the worker's; its HOME in its own folder
                assert int(measured.error.message) in settings.job_uids  # type: ignore[operator]
                assert measured.error.detail["home"] == str(workdir / "home")
            else:  # a link is never followed: the worker read nothing of /etc/hostname
                assert measured.status == "failed" and measured.error.code == "internal"
            assert workdir.stat().st_uid == os.geteuid()  # the folder is the worker's again
    finally:
        engine.dispose()
