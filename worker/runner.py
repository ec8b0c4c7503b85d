"""Runs one attempt of a job: claims it, runs the engine in a child process under limits, stores
the artifacts and records the outcome. The database stays the source of truth throughout."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from service.database import make_engine, make_session_factory, transaction
from service.jobs import state
from service.settings import Settings, get_settings
from service.storage import LocalStorage
from service.tables import Artifact, Dataset, Job, OnnxModel

log = logging.getLogger(__name__)

# Where each stage sits on the job's overall progress bar.
STAGE_SPAN = {
    "validating": (0.0, 0.03),
    "preprocessing": (0.03, 0.10),
    "calibrating": (0.10, 0.50),
    "quantizing": (0.50, 0.60),
    "evaluating": (0.60, 0.95),
    "reporting": (0.95, 1.0),
}
PROGRESS_INTERVAL_S = 0.5
CANCEL_POLL_S = 1.0


def overall_progress(stage: str, fraction: float) -> float:
    start, end = STAGE_SPAN.get(stage, (0.0, 1.0))
    return start + (end - start) * max(0.0, min(1.0, fraction))


@dataclass
class ChildOutcome:
    status: str  # succeeded | failed | cancelled
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] | None = None


def _child_env() -> dict[str, str]:
    """The job process imports `worker` from the same tree as this process, installed or not."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _error(code: str, message: str, **detail: Any) -> dict[str, Any]:
    return {"code": code, "message": message, "detail": detail}


class JobRunner:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], storage: LocalStorage) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.storage = storage

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> JobRunner:
        settings = settings or get_settings()
        engine = make_engine(settings)
        storage = LocalStorage(settings.resolved_storage_dir)
        storage.ensure()
        return cls(settings, make_session_factory(engine), storage)

    def close(self) -> None:
        bind = self.session_factory.kw.get("bind")
        if bind is not None:
            bind.dispose()

    # -- the attempt ---------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        with transaction(self.session_factory) as session:
            attempt = state.claim(session, job_id, self.settings.job_lease_s)
        if attempt is None:
            log.info("job %s is not queued (duplicate or late message, or cancelled); skipping", job_id)
            return
        log.info("job %s: attempt %d started", job_id, attempt)
        workdir = self.settings.resolved_work_dir / job_id / str(attempt)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            self._write_job_file(job_id, workdir)
            outcome = self._run_child(job_id, attempt, workdir)
            if outcome.status == "succeeded":
                self._store_success(job_id, attempt, outcome)
            elif outcome.status != "abandoned":
                with transaction(self.session_factory) as session:
                    state.fail(session, job_id, attempt, outcome.error or {}, status=outcome.status)
        except Exception as exc:
            log.exception("job %s: attempt %d broke", job_id, attempt)
            with transaction(self.session_factory) as session:
                state.fail(session, job_id, attempt, _error("internal", f"The job failed unexpectedly: {exc}"))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        log.info("job %s: attempt %d finished", job_id, attempt)

    def _write_job_file(self, job_id: str, workdir: Path) -> None:
        with transaction(self.session_factory) as session:
            job = session.get(Job, job_id)
            assert job is not None
            model = session.get(OnnxModel, job.model_id)
            if model is None or model.deleted_at is not None:
                raise RuntimeError("the job's model was deleted")

            def source(dataset_id: str | None) -> dict[str, Any] | None:
                if dataset_id is None:
                    return None
                row = session.get(Dataset, dataset_id)
                if row is None or row.deleted_at is not None:
                    raise RuntimeError(f"dataset {dataset_id} was deleted")
                return {"path": str(self.storage.local_path(row.storage_key)), "format": row.format,
                        "preprocess": row.preprocess}

            spec = {
                "job_id": job.id,
                "model_path": str(self.storage.local_path(f"{model.storage_prefix}/{model.file_name}")),
                "inputs": model.inputs,
                "recipe": job.recipe,
                "evaluation": {
                    **job.evaluation,
                    "max_seconds": self.settings.evaluation_max_seconds,
                    "max_samples": self.settings.evaluation_max_samples,
                    "latency_runs": min(job.evaluation.get("latency_runs", 50), self.settings.max_latency_runs),
                },
                "calibration": source(job.calibration_dataset_id),
                "evaluation_data": source(job.evaluation_dataset_id),
                "reused_calibration": job.evaluation_dataset_id is not None
                and job.evaluation_dataset_id == job.calibration_dataset_id,
                "limits": {"memory_bytes": self.settings.job_memory_bytes, "cpu_s": self.settings.job_timeout_s * 4},
            }
        (workdir / "job.json").write_text(json.dumps(spec))

    def _run_child(self, job_id: str, attempt: int, workdir: Path) -> ChildOutcome:
        stderr = (workdir / "stderr.log").open("wb")
        child = subprocess.Popen(
            [sys.executable, "-m", "worker.job_process", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # its own process group, so a stop reaches its threads' children too
            env=_child_env(),
        )
        lines: queue.Queue[bytes] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or []], daemon=True)
        reader.start()
        started = time.monotonic()
        last_write = last_cancel_check = 0.0
        pending: tuple[str, float] = ("validating", 0.0)
        written: tuple[str, float] | None = None
        renew_s = self.settings.job_lease_s / 4
        shown = 0.0
        try:
            while True:
                try:
                    line = lines.get(timeout=0.2)
                    message = json.loads(line)
                    pending = (str(message["stage"]), float(message["fraction"]))
                except queue.Empty:
                    pass
                except (ValueError, KeyError):
                    log.debug("job %s: unparsed child output %r", job_id, line[:200])
                now = time.monotonic()
                # Write progress when it moved (at most every PROGRESS_INTERVAL_S), and renew the lease.
                if (pending != written and now - last_write >= PROGRESS_INTERVAL_S) or now - last_write >= renew_s:
                    stage, fraction = pending
                    shown = max(shown, overall_progress(stage, fraction))  # never backwards
                    with transaction(self.session_factory) as session:
                        still_ours = state.progress(session, job_id, attempt, stage, shown, self.settings.job_lease_s)
                    last_write, written = now, pending
                    if not still_ours:
                        self._stop(child)
                        return ChildOutcome("abandoned")
                if now - last_cancel_check >= CANCEL_POLL_S:
                    last_cancel_check = now
                    with self.session_factory() as session:
                        if state.cancel_requested(session, job_id):
                            self._stop(child)
                            return ChildOutcome("cancelled", error=_error("cancelled", "The job was cancelled at the user's request."))
                if now - started > self.settings.job_timeout_s:
                    self._stop(child)
                    return ChildOutcome("failed", error=_error(
                        "timeout",
                        f"The job ran longer than the limit of {self.settings.job_timeout_s} s and was stopped; "
                        "use fewer calibration samples or latency runs, or ask the operator to raise QAAS_JOB_TIMEOUT_S.",
                        limit_s=self.settings.job_timeout_s))
                if child.poll() is not None and lines.empty():
                    reader.join(timeout=5)
                    if not lines.empty():
                        continue
                    break
        finally:
            stderr.close()
            if child.poll() is None:
                self._stop(child)
        return self._read_outcome(child.returncode, workdir)

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        except ProcessLookupError:
            pass

    def _read_outcome(self, returncode: int, workdir: Path) -> ChildOutcome:
        path = workdir / "outcome.json"
        if returncode == 0 and path.exists():
            data = json.loads(path.read_text())
            return ChildOutcome(data["status"], data.get("result"), data.get("error"), data.get("artifacts"))
        tail = (workdir / "stderr.log").read_bytes()[-2000:].decode(errors="replace").strip()
        if returncode < 0:
            sig = signal.Signals(-returncode).name
            if sig in ("SIGKILL", "SIGXCPU"):
                return ChildOutcome("failed", error=_error(
                    "resource_limit",
                    f"The job process was killed by {sig}, most likely for exceeding its memory or CPU limit "
                    f"({self.settings.job_memory_bytes} bytes of memory); use fewer calibration samples or a "
                    "smaller calibration batch.", signal=sig, stderr_tail=tail[-500:]))
            return ChildOutcome("failed", error=_error(
                "internal", f"The job process crashed with {sig}; the model may trigger a bug in ONNX Runtime.",
                signal=sig, stderr_tail=tail[-500:]))
        return ChildOutcome("failed", error=_error(
            "internal", f"The job process exited with code {returncode} without a result.",
            exit_code=returncode, stderr_tail=tail[-500:]))

    def _store_success(self, job_id: str, attempt: int, outcome: ChildOutcome) -> None:
        prefix = f"jobs/{job_id}/{attempt}"
        rows = []
        for item in outcome.artifacts or []:
            stored = self.storage.put_file(f"{prefix}/{item['name']}", Path(item["path"]), move=True)
            rows.append(Artifact(job_id=job_id, name=item["name"], storage_key=stored.key,
                                 size_bytes=stored.size_bytes, sha256=stored.sha256, media_type=item["media_type"]))
        with transaction(self.session_factory) as session:
            session.execute(delete(Artifact).where(Artifact.job_id == job_id))
            session.add_all(rows)
            if not state.succeed(session, job_id, attempt, outcome.result or {}):
                session.rollback()
                self.storage.delete_prefix(prefix)
                log.warning("job %s: attempt %d lost ownership before it could finish", job_id, attempt)
