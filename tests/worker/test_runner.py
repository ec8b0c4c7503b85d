"""The runner's and the sweep's answers to faults, on a real database: writes that outlive a
database outage, a success whose commit answer was lost, hand-backs, a cancellation that races
the finish, and the cleanup of what killed attempts leave behind. The real-process versions of
these live in tests/e2e/test_faults.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.jobfile import ArtifactItem, ChildOutcome
from core.lifecycle import AttemptStatus, overall_progress
from core.result import Comparison, JobResult, ModelMetrics
from service.database import transaction, utcnow
from service.jobs import state
from service.queue import celery_config
from service.settings import Settings
from service.storage import LocalStorage, StorageUnavailable
from service.storage.s3 import S3Storage
from service.tables import Artifact, Job, OnnxModel
from tests.s3 import S3Server, dead_object_store
from tests.service.test_job_state import _job, store_job_model
from worker.reaper import sweep
from worker.runner import DatabaseUnavailable, JobRunner
from worker.writes import write

Factory = sessionmaker[Session]


def _claim(factory: Factory, job_id: str) -> int:
    with transaction(factory) as s:
        attempt = state.claim(s, job_id, 60)
    assert attempt is not None
    return attempt


def _expire(factory: Factory, job_id: str) -> None:
    with transaction(factory) as s:
        past = utcnow() - timedelta(seconds=1)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))


def _job_row(factory: Factory, job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


class Outage:
    """A session factory whose next `failures` sessions find the database gone."""

    def __init__(self, factory: Factory, failures: int) -> None:
        self.factory = factory
        self.failures = failures

    def __call__(self) -> Session:
        session = self.factory()
        if self.failures > 0:
            self.failures -= 1

            def refused(*args: Any, **kwargs: Any) -> Any:
                raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

            session.execute = refused  # type: ignore[method-assign]
        return session


class LostAnswer(Session):
    """The first COMMIT lands, but the connection drops before its answer arrives."""

    dropped = False

    def commit(self) -> None:
        super().commit()
        if not LostAnswer.dropped:
            LostAnswer.dropped = True
            raise OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))


@pytest.fixture
def settings(sqlite_settings: Settings) -> Settings:
    return sqlite_settings.model_copy(update={"job_lease_s": 2.0, "queued_resend_s": 600.0})


@pytest.fixture
def factory(settings: Settings) -> Iterator[Factory]:
    from service.database import make_engine, make_session_factory

    engine = make_engine(settings)
    yield make_session_factory(engine)
    engine.dispose()


def _runner(settings: Settings, factory: Any, enqueue: Any = None) -> JobRunner:
    storage = LocalStorage(settings.resolved_storage_dir)
    store_job_model(storage)
    return JobRunner(settings, factory, storage, enqueue)


def _outcome(tmp_path: Path) -> ChildOutcome:
    model = tmp_path / "quantized.onnx"
    model.write_bytes(b"\x08\x01" * 1000)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"ok": True}))
    result = JobResult(
        original=ModelMetrics(size_bytes=2000),
        quantized=ModelMetrics(size_bytes=2000),
        comparison=Comparison(size_ratio=1.0),
    )
    return ChildOutcome(
        AttemptStatus.SUCCEEDED,
        result=result,
        artifacts=(
            ArtifactItem("quantized.onnx", model, "application/octet-stream"),
            ArtifactItem("report.json", report, "application/json"),
        ),
    )


# -- the state machine's fault transitions (both databases) ----------------------------------------


def test_a_cancellation_that_races_the_finish_wins(session_factory: Factory) -> None:
    job_id = _job(session_factory)
    attempt = _claim(session_factory, job_id)
    with transaction(session_factory) as s:
        state.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    with transaction(session_factory) as s:
        assert not state.succeed(s, job_id, attempt, {"x": 1})  # the user asked first
        assert not state.release(s, job_id, attempt)  # nor handed back to run again
        assert state.fail(s, job_id, attempt, state.CANCELLED_ERROR, status="cancelled")
    assert _job_row(session_factory, job_id).status == "cancelled"


def test_a_handed_back_job_runs_again_under_the_same_attempt_number(session_factory: Factory) -> None:
    job_id = _job(session_factory)
    assert _claim(session_factory, job_id) == 1
    with transaction(session_factory) as s:
        assert state.release(s, job_id, 1)
        assert not state.release(s, job_id, 1)  # once
        assert not state.progress(s, job_id, 1, "evaluating", 0.7, 60)  # the released attempt is over
    job = _job_row(session_factory, job_id)
    assert (job.status, job.attempts, job.lease_expires_at, job.started_at) == ("queued", 0, None, None)
    assert _claim(session_factory, job_id) == 1  # a stop on purpose does not count towards worker_lost


def test_a_lost_job_whose_cancellation_was_asked_ends_cancelled_not_requeued(
    session_factory: Factory, db_settings: Settings
) -> None:
    job_id = _job(session_factory)
    _claim(session_factory, job_id)
    with transaction(session_factory) as s:
        state.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    _expire(session_factory, job_id)
    sent: list[str] = []
    done = sweep(session_factory, sent.append, db_settings)
    assert done["cancelled"] == [job_id] and done["requeued"] == [] and sent == []
    job = _job_row(session_factory, job_id)
    assert job.status == "cancelled" and job.error == state.CANCELLED_ERROR


# -- the sweep ---------------------------------------------------------------------------------


def test_the_sweep_clears_partial_files_and_scratch_of_lost_attempts(settings: Settings, factory: Factory) -> None:
    storage = LocalStorage(settings.resolved_storage_dir)
    work = settings.resolved_work_dir
    requeued, failed, queued = _job(factory), _job(factory), _job(factory)
    for job_id in (requeued, failed):
        attempt = _claim(factory, job_id)
        (storage.root / f"jobs/{job_id}/{attempt}").mkdir(parents=True)
        (storage.root / f"jobs/{job_id}/{attempt}/quantized.onnx").write_bytes(b"partial")
        (work / job_id / str(attempt)).mkdir(parents=True)
        _expire(factory, job_id)
    (work / queued / "0").mkdir(parents=True)
    with transaction(factory) as s:  # the second has used up its attempts
        s.execute(update(Job).where(Job.id == failed).values(attempts=settings.job_max_attempts))

    done = sweep(factory, lambda _: None, settings, storage)
    assert done["requeued"] == [requeued] and done["failed"] == [failed]
    assert not (storage.root / f"jobs/{requeued}/1").exists()  # a partial set is never kept
    assert not (storage.root / f"jobs/{failed}").exists()
    assert not (work / failed).exists()  # ended: its scratch goes
    assert (work / requeued).exists() and (work / queued).exists()  # their next attempt clears them


def test_the_sweep_aborts_the_unfinished_multipart_uploads_of_lost_attempts(
    settings: Settings, factory: Factory, s3_env: dict[str, str], s3_server: S3Server
) -> None:
    """The README: a sweep removes what a killed attempt left, unfinished multipart uploads included
    (on S3 an upload its worker never completed holds its parts, and is billed, until aborted)."""
    storage = S3Storage.from_settings(Settings())
    client = s3_server.client()
    requeued, failed = _job(factory), _job(factory)
    for job_id in (requeued, failed):
        attempt = _claim(factory, job_id)
        key = f"{storage.prefix}jobs/{job_id}/{attempt}/quantized.onnx"
        upload = client.create_multipart_upload(Bucket=storage.bucket, Key=key)
        client.upload_part(Bucket=storage.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
        _expire(factory, job_id)
    with transaction(factory) as s:  # the second has used up its attempts
        s.execute(update(Job).where(Job.id == failed).values(attempts=settings.job_max_attempts))
    assert len(s3_server.unfinished_uploads(storage.bucket)) == 2

    done = sweep(factory, lambda _: None, settings, storage)
    assert done["requeued"] == [requeued] and done["failed"] == [failed]
    assert s3_server.unfinished_uploads(storage.bucket) == []
    assert storage.keys("jobs/") == []


def test_the_sweep_resends_every_queued_job_when_asked(settings: Settings, factory: Factory) -> None:
    job_id = _job(factory)
    sent: list[str] = []
    assert sweep(factory, sent.append, settings)["resent"] == []  # not stale yet
    assert sweep(factory, sent.append, settings, resend_all=True)["resent"] == [job_id]

    def broker_down(_: str) -> None:
        raise ConnectionError("broker down")

    assert sweep(factory, broker_down, settings, resend_all=True)["unsent"] == [job_id]
    assert sent == [job_id]


# -- the runner --------------------------------------------------------------------------------


def test_a_success_whose_commit_answer_was_lost_keeps_its_files(
    settings: Settings, factory: Factory, tmp_path: Path
) -> None:
    job_id = _job(factory)
    attempt = _claim(factory, job_id)
    LostAnswer.dropped = False
    flaky = sessionmaker(factory.kw["bind"], class_=LostAnswer, expire_on_commit=False)
    runner = _runner(settings, flaky)
    runner._store_success(job_id, attempt, _outcome(tmp_path))
    assert LostAnswer.dropped
    job = _job_row(factory, job_id)
    assert job.status == "succeeded" and job.attempts == attempt
    with factory() as s:
        keys = s.scalars(select(Artifact.storage_key).where(Artifact.job_id == job_id)).all()
    assert sorted(keys) == [f"jobs/{job_id}/1/quantized.onnx", f"jobs/{job_id}/1/report.json"]
    assert all((settings.resolved_storage_dir / key).is_file() for key in keys)  # not deleted as if the job were lost


def test_a_success_after_losing_the_job_leaves_nothing_behind(
    settings: Settings, factory: Factory, tmp_path: Path
) -> None:
    job_id = _job(factory)
    attempt = _claim(factory, job_id)
    _expire(factory, job_id)
    sweep(factory, lambda _: None, settings)  # requeued: attempt 1 is no longer the owner
    runner = _runner(settings, factory)
    (settings.resolved_storage_dir / f"jobs/{job_id}/7").mkdir(parents=True)  # from some older attempt
    runner._store_success(job_id, attempt, _outcome(tmp_path))
    assert _job_row(factory, job_id).status == "queued"
    assert not (settings.resolved_storage_dir / f"jobs/{job_id}/{attempt}").exists()
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Artifact)) == 0


def test_writes_are_retried_through_a_short_database_outage(settings: Settings, factory: Factory) -> None:
    job_id = _job(factory)
    attempt = _claim(factory, job_id)

    def fail(session: Session) -> bool:
        return state.fail(session, job_id, attempt, {"code": "internal"})

    assert write(Outage(factory, failures=2), settings.job_lease_s, "record", fail)
    assert _job_row(factory, job_id).status == "failed"


def test_a_write_gives_up_after_a_lease_and_the_job_is_left_to_the_sweep(settings: Settings, factory: Factory) -> None:
    job_id = _job(factory)
    attempt = _claim(factory, job_id)

    def fail(session: Session) -> bool:
        return state.fail(session, job_id, attempt, {"code": "internal"})

    assert write(Outage(factory, failures=1000), settings.job_lease_s, "record", fail) is None
    assert _job_row(factory, job_id).status == "running"


def test_a_claim_without_a_database_is_retried_by_the_task(settings: Settings, factory: Factory) -> None:
    job_id = _job(factory)
    with pytest.raises(DatabaseUnavailable):
        _runner(settings, Outage(factory, failures=1)).run(job_id)
    assert _job_row(factory, job_id).status == "queued"


@pytest.mark.parametrize("broker_up", [True, False])
def test_a_hand_back_returns_the_job_and_resends_it(settings: Settings, factory: Factory, broker_up: bool) -> None:
    job_id = _job(factory)
    attempt = _claim(factory, job_id)
    sent: list[str] = []

    def enqueue(job: str, countdown: float) -> None:
        if not broker_up:
            raise ConnectionError("broker down")
        assert countdown == 0  # a stop on purpose: at once
        sent.append(job)

    runner = _runner(settings, factory, enqueue)
    workdir = runner._workdir(job_id, attempt)
    runner._hand_back(job_id, attempt, workdir)
    assert not (settings.resolved_work_dir / job_id).exists()
    job = _job_row(factory, job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert sent == ([job_id] if broker_up else [])
    with factory() as s:  # unsent: due at the next sweep, not after QAAS_QUEUED_RESEND_S
        assert (job_id in state.stale_queued(s, settings.queued_resend_s)) is not broker_up


def test_a_job_whose_object_storage_is_down_waits_in_line_then_fails_after_the_last_attempt(
    settings: Settings, factory: Factory
) -> None:
    settings = settings.model_copy(update={"job_max_attempts": 3, "storage_retry_s": 5.0})
    job_id = _job(factory)
    sent: list[tuple[str, float]] = []
    runner = JobRunner(settings, factory, dead_object_store(), lambda job, countdown: sent.append((job, countdown)))
    for attempt in (1, 2):
        runner.run(job_id)  # cannot fetch the job's model
        job = _job_row(factory, job_id)
        assert (job.status, job.stage, job.attempts, job.error, job.lease_expires_at) == (
            "queued",
            "queued",
            attempt,  # counted, unlike a hand-back
            None,
            None,
        )
        assert job.progress_note is not None and f"attempt {attempt} of 3" in job.progress_note
    assert sent == [(job_id, 5.0), (job_id, 10.0)]  # later each time
    runner.run(job_id)
    job = _job_row(factory, job_id)
    assert (job.status, job.attempts, job.progress_note) == ("failed", 3, None)
    assert job.error is not None and job.error["code"] == "storage_unavailable"
    assert "3 attempts" in job.error["message"] and "read its inputs" in job.error["message"]
    assert len(sent) == 2
    assert not (settings.resolved_work_dir / job_id).exists()
    with transaction(factory) as s:
        assert state.claim(s, job_id, 60) is None  # over for good


def test_a_job_cancelled_while_its_storage_was_down_ends_cancelled(settings: Settings, factory: Factory) -> None:
    job_id = _job(factory)
    attempt = _claim(factory, job_id)
    with transaction(factory) as s:
        state.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    sent: list[str] = []
    runner = JobRunner(settings, factory, dead_object_store(), lambda job, countdown: sent.append(job))
    workdir = runner._workdir(job_id, attempt)
    runner._storage_down(job_id, attempt, workdir, StorageUnavailable("down"), storing=True)
    job = _job_row(factory, job_id)
    assert (job.status, job.error) == ("cancelled", state.CANCELLED_ERROR) and sent == []


@pytest.mark.parametrize("gone", ["row", "object"])
def test_a_job_whose_input_is_gone_fails_at_once_with_input_missing(
    settings: Settings, factory: Factory, gone: str
) -> None:
    job_id = _job(factory)
    storage = LocalStorage(settings.resolved_storage_dir)
    if gone == "row":
        store_job_model(storage)
        with transaction(factory) as s:
            s.execute(update(OnnxModel).values(deleted_at=utcnow()))
    sent: list[str] = []
    JobRunner(settings, factory, storage, lambda job, countdown: sent.append(job)).run(job_id)
    job = _job_row(factory, job_id)
    assert (job.status, job.attempts, sent) == ("failed", 1, [])
    assert job.error is not None and job.error["code"] == "input_missing", job.error
    assert "model" in job.error["message"] and "upload it again" in job.error["message"]


def test_an_attempt_clears_the_scratch_earlier_attempts_left_on_this_host(settings: Settings, factory: Factory) -> None:
    runner = _runner(settings, factory)
    killed = settings.resolved_work_dir / "job-1" / "1"
    killed.mkdir(parents=True)
    (killed / "stderr.log").write_text("the worker was SIGKILLed here")
    workdir = runner._workdir("job-1", 2)
    assert sorted(p.name for p in workdir.parent.iterdir()) == ["2"]
    runner._remove_workdir(workdir)
    assert not workdir.parent.exists()


def test_celery_settings_agree_with_the_leases(settings: Settings) -> None:
    production = settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0", "job_timeout_s": 7200})
    config = celery_config(production)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["worker_cancel_long_running_tasks_on_connection_loss"]
    assert config["broker_connection_max_retries"] is None
    # Celery's limits sit behind the runner's own timeout, and Redis never redelivers before them.
    assert config["task_soft_time_limit"] > production.job_timeout_s
    assert config["task_time_limit"] > config["task_soft_time_limit"]
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]


# -- progress notes ------------------------------------------------------------------------------

TALKING_JOB = """
import pathlib, sys, time
import worker.job_process as job_process
from core.progress import CandidateProgress, Note
from core.errors import RuleError
go = pathlib.Path(sys.argv[2])

def wait(step):
    while not (go / step).exists():
        time.sleep(0.02)

def run(job, workdir, report):
    report(job_process.Stage.QUANTIZING, 0.1)
    report.note(Note("candidate 1 of 2: static", CandidateProgress(1, 2, "static")))
    report(job_process.Stage.QUANTIZING, 0.2)  # a line without a note leaves the note standing
    wait("1")
    report.note(Note("search step 1: back to float"))
    wait("2")
    raise RuleError("quantization_failed", "scripted", {})

job_process.run = run
sys.exit(job_process.main(pathlib.Path(sys.argv[1])))
"""


def test_the_engines_note_reaches_the_job_whole(
    settings: Settings, factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the job process says it does (text, and auto's candidate) lands in both columns from the
    same note, stays while lines without a note pass, is replaced whole by the next note, and is
    cleared when the job ends."""
    from core.progress import CandidateProgress, candidate_of
    from tests.security.test_job_sandbox import job_process_is

    job_process_is(monkeypatch, TALKING_JOB, str(tmp_path))
    job_id = _job(factory)
    runner = _runner(settings, factory)
    thread = threading.Thread(target=runner.run, args=(job_id,))
    thread.start()

    def said(note: str, progress: float = 0.0) -> tuple[str | None, CandidateProgress | None]:
        """The job's note and candidate once its note is `note` and its progress at least `progress`
        (or as they stand after a minute)."""
        deadline = time.monotonic() + 60
        while True:
            job = _job_row(factory, job_id)
            if (job.progress_note == note and job.progress >= progress) or time.monotonic() > deadline:
                return job.progress_note, candidate_of(job.progress_detail)
            time.sleep(0.05)

    try:
        # Read once the noteless line after the note (0.2 of quantizing) was written too.
        after = overall_progress("quantizing", 0.2)
        first = "candidate 1 of 2: static"
        assert said(first, after) == (first, CandidateProgress(1, 2, "static"))
        (tmp_path / "1").touch()
        assert said("search step 1: back to float") == ("search step 1: back to float", None)
    finally:
        (tmp_path / "1").touch()
        (tmp_path / "2").touch()
        thread.join(timeout=60)
    job = _job_row(factory, job_id)
    assert (job.status, job.progress_note, job.progress_detail) == ("failed", None, None)


# -- the pre-flight's timings ------------------------------------------------------------------------

TIMING_JOB = """
import json, pathlib, sys
import worker.job_process as job_process
from core.errors import RuleError
from core.preflight_timings import MEASURED_FILE, this_machine
from worker.preflight_timings import onnxruntime_version
out = pathlib.Path(sys.argv[2])
timing = {"float_ms": 1.0, "island_ms": 1.5, "int8_ms": {"qdq": 0.5}}

def run(job, workdir, report):
    handed = job.preflight_timings
    seen = sorted(json.loads(handed.read_text())["entries"]) if handed else []
    n = len(list(out.glob("seen-*")))
    (out / f"seen-{n}").write_text(json.dumps(seen))
    layers = {f"1:{c * 32}": timing for c in "abc" if f"1:{c * 32}" not in seen}  # this model's, less the known
    (out / f"measured-{n}").write_text(str(len(layers)))
    if layers:
        machine = this_machine(onnxruntime_version()).model_dump()
        (workdir / MEASURED_FILE).write_text(json.dumps({**machine, "entries": layers}))
    elif (out / "hostile").exists():  # what a job that ran a hostile model could leave
        (workdir / MEASURED_FILE).write_bytes((out / "hostile").read_bytes())
    raise RuleError("quantization_failed", "scripted", {})

job_process.run = run
sys.exit(job_process.main(pathlib.Path(sys.argv[1])))
"""


def test_the_worker_hands_auto_jobs_its_preflight_timings_and_keeps_what_they_measure(
    settings: Settings,
    factory: Factory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two auto jobs on the same model: the first measures the model's layers in its own folder and the worker
    merges them into its cache; the second gets them read-only and measures nothing. What that one leaves
    instead, something other than timings, changes nothing, and the log says so."""
    from tests.security.test_job_sandbox import job_process_is

    job_process_is(monkeypatch, TIMING_JOB, str(tmp_path))
    runner = _runner(settings, factory)

    def auto_job() -> None:
        job_id = _job(factory)
        with transaction(factory) as s:
            s.execute(update(Job).where(Job.id == job_id).values(recipe={"mode": "auto"}))
        runner.run(job_id)
        assert _job_row(factory, job_id).status == "failed"  # the scripted job's end

    auto_job()
    [cache] = settings.preflight_cache_dir.glob("preflight-*.json")
    before = cache.read_bytes()
    (tmp_path / "hostile").write_text(json.dumps({"cpu_model": "x", "entries": {"1:" + "d" * 32: {"float_ms": -1}}}))
    with caplog.at_level("WARNING", logger="worker.preflight_timings"):
        auto_job()
    assert [json.loads((tmp_path / f"seen-{i}").read_text()) for i in (0, 1)] == [[], ["1:" + c * 32 for c in "abc"]]
    assert [(tmp_path / f"measured-{i}").read_text() for i in (0, 1)] == ["3", "0"]
    assert cache.read_bytes() == before
    assert any("pre-flight timings a job left" in r.getMessage() for r in caplog.records)
