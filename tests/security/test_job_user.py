"""A job's process is a boundary (worker/sandbox.py `JobUser`): under a uid of its own it reads none of
the worker's secrets and no other tenant's file, changes nothing a later job reads, and nothing of it
outlives its job; what the worker stores is the bytes it checked, whatever the job does to its names.
The runner is the real one; the job process is a script that plays a hostile job (`job_process_is`)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from service.database import make_engine, make_session_factory, transaction
from service.settings import Settings
from service.storage import LocalStorage
from service.tables import Dataset, Job, OnnxModel
from tests.conftest import unavailable
from tests.security.test_job_sandbox import HAND_BACK, Factory, job, job_process_is
from tests.service.test_job_state import _job, store_job_model
from worker.runner import JobRunner

ANOTHER_JOBS_UID = 299999  # the top of the default range: the tests' jobs take the lowest free uids
NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _python_out_of_reach() -> str | None:
    """Why another uid cannot run this Python and import the service, or None."""
    try:
        subprocess.run(
            [sys.executable, "-c", "import worker.sandbox"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            env={"PYTHONPATH": str(ROOT)},
            capture_output=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None


def require_job_user() -> None:
    """Skip unless this machine can give a job a uid of its own: a worker running as root (CI runs as root),
    with a Python every user may run. As root the second is a fault of the installation, not of the machine,
    so CI (QAAS_REQUIRE_SERVICES=1) fails instead: .ci/run builds its venv from such a Python."""
    if os.geteuid() != 0:
        pytest.skip("only a worker running as root gives a job a uid of its own (CI runs as root)")
    if problem := _python_out_of_reach():
        unavailable(
            "a Python another uid may run",
            f"{sys.executable}: {problem}",
            "build the venv from an interpreter every user may enter and run (not pyenv's under /root, 0700): "
            ".ci/run does, into .venv-ci",
        )


@pytest.fixture
def as_root() -> None:
    require_job_user()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data dir every uid may pass through on its way to a job's folder. pytest's tmp_path is 0700, so
    a job's uid could not reach its folder there, and the worker would run the job as itself."""
    root = Path(tempfile.mkdtemp(prefix="qaas-job-user-", dir="/tmp"))
    root.chmod(0o711)
    yield root / "var"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def factory(sqlite_settings: Settings) -> Iterator[Factory]:
    engine = make_engine(sqlite_settings)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def storage(sqlite_settings: Settings) -> LocalStorage:
    storage = LocalStorage(sqlite_settings.resolved_storage_dir)
    store_job_model(storage)
    return storage


@pytest.fixture
def runner(sqlite_settings: Settings, factory: Factory, storage: LocalStorage) -> JobRunner:
    return JobRunner(sqlite_settings, factory, storage)


def _stored(storage: LocalStorage, key: str, content: bytes) -> str:
    writer = storage.writer(key)
    writer.write(content)
    return writer.commit().sha256


def job_with_a_dataset(factory: Factory, storage: LocalStorage) -> str:
    """A job whose calibration dataset reaches it as a hard link to the worker's cached file."""
    model_sha = _stored(storage, "models/m/model.onnx", b"model bytes")
    data_sha = _stored(storage, "datasets/d/calib.npz", b"calibration bytes")
    with transaction(factory) as s:
        model = OnnxModel(
            name="m",
            storage_prefix="models/m",
            file_name="model.onnx",
            sha256=model_sha,
            size_bytes=11,
            ir_version=8,
            opset=13,
            producer="t",
            inputs=[],
            outputs=[],
            op_counts={},
            external_data=[],
        )
        dataset = Dataset(
            name="calib.npz",
            storage_key="datasets/d/calib.npz",
            format="npz",
            num_samples=1,
            size_bytes=17,
            sha256=data_sha,
            tensors={},
            has_labels=False,
        )
        s.add_all([model, dataset])
        s.flush()
        row = Job(model_id=model.id, recipe={"mode": "dynamic"}, evaluation={}, calibration_dataset_id=dataset.id)
        s.add(row)
        s.flush()
        return row.id


PROBE = """
import json, os, pathlib, resource, sys
workdir, plan = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
dataset = json.loads((workdir / "job.json").read_text())["calibration"]["path"]
tries = {
    "the worker's environment": lambda: pathlib.Path(f"/proc/{os.getppid()}/environ").read_bytes(),
    "another tenant's stored file": lambda: pathlib.Path(plan["stored"]).read_bytes(),
    "another job's input": lambda: pathlib.Path(plan["other_job"]).read_bytes(),
    "its dataset, a hard link into the cache": lambda: open(dataset, "r+b").write(b"poison"),
    "a file of the input cache": lambda: open(plan["cached"], "r+b").write(b"poison"),
    "a new file in the input cache": lambda: open(pathlib.Path(plan["cached"]).with_name("poison"), "xb"),
}
got = {}
for what, attempt in tries.items():
    try:
        attempt()
        got[what] = "done"
    except OSError as exc:
        got[what] = type(exc).__name__
status = (pathlib.Path("/proc/self/status").read_text())
me = {
    "uid": os.getuid(),
    "groups": os.getgroups(),
    "no_new_privs": "NoNewPrivs:\\t1" in status,
    "processes": resource.getrlimit(resource.RLIMIT_NPROC)[0],
}
error = {"code": "internal", "message": "probed", "detail": {"got": got, "me": me}}
(workdir / "outcome.json").write_text(json.dumps({"status": "failed", "error": error}))
"""


def test_the_job_reads_no_secret_of_the_worker_nor_another_tenants_file_and_cannot_poison_the_cache(
    as_root: None, runner: JobRunner, factory: Factory, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = runner.settings
    monkeypatch.setenv("QAAS_DATABASE_URL", "postgresql+psycopg://qaas:hunter2@db:5432/qaas")  # in our environ
    stored_sha = _stored(storage, "datasets/other-tenant/secret.npz", b"another tenant's data")
    other_job = settings.resolved_work_dir / "another-job" / "1"  # as a running job of another uid has it
    (other_job / "inputs").mkdir(parents=True)
    (other_job / "inputs" / "model.onnx").write_bytes(b"another tenant's model")
    os.chown(other_job, ANOTHER_JOBS_UID, ANOTHER_JOBS_UID)
    other_job.chmod(0o700)
    job_id = job_with_a_dataset(factory, storage)
    cached = settings.cache_dir / hashlib.sha256(b"calibration bytes").hexdigest()
    plan = {
        "stored": str(settings.resolved_storage_dir / "datasets/other-tenant/secret.npz"),
        "other_job": str(other_job / "inputs" / "model.onnx"),
        "cached": str(cached),
    }
    job_process_is(monkeypatch, PROBE, json.dumps(plan))

    runner.run(job_id)

    error = job(factory, job_id).error
    assert error is not None and error["message"] == "probed", error
    got, me = error["detail"]["got"], error["detail"]["me"]
    assert got == dict.fromkeys(got, "PermissionError") and len(got) == 6, got
    assert me["uid"] in settings.job_uids and me["uid"] != ANOTHER_JOBS_UID  # type: ignore[operator]
    assert me["groups"] == [] and me["no_new_privs"] and me["processes"] >= 1024, me
    assert cached.read_bytes() == b"calibration bytes"
    assert not cached.with_name("poison").exists()
    with storage.open("datasets/other-tenant/secret.npz") as stored:
        assert stored.read() == b"another tenant's data"
    assert hashlib.sha256(b"another tenant's data").hexdigest() == stored_sha


ESCAPE = """
import json, pathlib, subprocess, sys
workdir = pathlib.Path(sys.argv[1])
# A process in a session of its own (setsid), not in the job's process group: it outlives the job's process.
stray = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"],
    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
error = {"code": "internal", "message": "escaped", "detail": {"pid": stray.pid}}
(workdir / "outcome.json").write_text(json.dumps({"status": "failed", "error": error}))
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_nothing_of_a_job_outlives_it_not_even_a_process_in_a_session_of_its_own(
    as_root: None, runner: JobRunner, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_process_is(monkeypatch, ESCAPE)
    job_id = _job(factory)
    runner.run(job_id)
    error = job(factory, job_id).error
    assert error is not None and error["message"] == "escaped", error
    stray = int(error["detail"]["pid"])
    try:
        assert not _alive(stray), "the job's process in a session of its own outlived the job"
    finally:
        if _alive(stray):
            os.kill(stray, signal.SIGKILL)


HAND_OVER = """
import json, pathlib, sys
workdir, path = pathlib.Path(sys.argv[1]), sys.argv[2]
listed = [{"name": "quantized.onnx", "path": str(workdir / path), "media_type": "application/octet-stream"}]
result = {"original": {"size_bytes": 5}, "quantized": {"size_bytes": 5}, "comparison": {}}
(workdir / "outcome.json").write_text(json.dumps({"status": "succeeded", "result": result, "artifacts": listed}))
"""


def test_a_file_of_the_workers_in_the_work_dir_is_no_artifact(
    as_root: None, runner: JobRunner, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """job.json is a regular file of one link inside the work dir, but the worker wrote it, not the job."""
    job_process_is(monkeypatch, HAND_OVER, "job.json")
    job_id = _job(factory)
    runner.run(job_id)
    ended = job(factory, job_id)
    assert ended.status == "failed" and ended.error is not None and ended.error["code"] == "internal", ended.error
    assert not (runner.settings.resolved_storage_dir / f"jobs/{job_id}").exists()


def test_an_artifact_swapped_for_a_link_after_its_check_is_stored_as_checked(
    runner: JobRunner, factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's names for its artifacts become links to the worker's secret at the worst moment: after
    the check, as each is stored. What is stored is still the job's bytes."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the worker's secret")
    job_process_is(monkeypatch, HAND_BACK, json.dumps({"case": "well behaved", "secret": str(secret)}))
    job_id = _job(factory)
    put_file = runner.storage.put_file

    def swapped_then_put(key: str, src: Path, **kwargs: object) -> object:
        named = runner.settings.resolved_work_dir / job_id / "1" / "artifacts" / key.rsplit("/", 1)[-1]
        named.unlink()
        named.symlink_to(secret)
        return put_file(key, src, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner.storage, "put_file", swapped_then_put)
    runner.run(job_id)
    assert job(factory, job_id).status == "succeeded"
    stored = runner.settings.resolved_storage_dir / "jobs" / job_id / "1"
    assert (stored / "quantized.onnx").read_bytes() == b"model"
    assert (stored / "report.json").read_text() == "{}"
    assert not (stored / "quantized.onnx").is_symlink()


WHO_AM_I = """
import json, os, pathlib, sys
error = {"code": "internal", "message": "ran", "detail": {"uid": os.getuid()}}
(pathlib.Path(sys.argv[1]) / "outcome.json").write_text(json.dumps({"status": "failed", "error": error}))
"""


def test_a_worker_that_cannot_give_jobs_a_uid_says_once_what_they_can_reach(
    sqlite_settings: Settings,
    factory: Factory,
    storage: LocalStorage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`make run` as a normal user (or QAAS_JOB_UID_RANGE=off): jobs still run, as the worker's user, and
    the worker's log says what that costs, once."""
    settings = sqlite_settings.model_copy(update={"job_uid_range": "off"})
    runner = JobRunner(settings, factory, storage)
    job_process_is(monkeypatch, WHO_AM_I)
    caplog.set_level(logging.WARNING, logger="worker.sandbox")
    for _ in range(2):
        job_id = _job(factory)
        runner.run(job_id)
        error = job(factory, job_id).error
        assert error is not None and error["detail"] == {"uid": os.getuid()}, error
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.sandbox"]
    assert len(warnings) == 1, warnings
    assert "because QAAS_JOB_UID_RANGE is off" in warnings[0]
    assert "credentials" in warnings[0] and str(settings.resolved_data_dir) in warnings[0]


def test_compose_gives_jobs_uids_of_their_own_and_no_service_minios_root_user() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    worker = services["worker"]
    assert worker["user"] == "root" and worker["cap_drop"] == ["ALL"], worker
    assert set(worker["cap_add"]) == {"CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID"}
    assert "no-new-privileges:true" in worker["security_opt"]
    assert Settings(job_uid_range=worker["environment"]["QAAS_JOB_UID_RANGE"]).job_uids is not None
    minio_root = services["minio"]["environment"]["MINIO_ROOT_USER"]
    signed_in = {name: s["environment"].get("AWS_ACCESS_KEY_ID") for name, s in services.items() if "environment" in s}
    assert signed_in["api"] and signed_in["worker"]
    assert not [name for name, key in signed_in.items() if key == minio_root and name != "create-bucket"], signed_in
