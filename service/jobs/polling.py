"""`GET /v1/jobs/{id}`'s answer, serialized once per version of the job's row and served again while the
row's `updated_at` holds.

Every change a client can see (status, stage, progress, result, measurements) goes through the state
machine or the measurements, and each bumps `updated_at` (the event streams' ids rely on the same). A poll
costs one primary-key read of the tenant and `updated_at`; only a poll that finds a new version loads
the whole row, validates it and serializes it. The check is against the database on every poll, so
API replicas never serve each other's stale answers, and a deleted job is 404 at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime

from sqlalchemy import Engine, bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from service.jobs import service
from service.jobs.schemas import JobOut
from service.tables import Job

_VERSION = select(Job.tenant, Job.updated_at).where(Job.id == bindparam("job_id"))


class PolledJobs:
    """The answers last served, newest used last, bounded in bytes; shared by the request threads."""

    def __init__(
        self, engine: Engine, factory: sessionmaker[Session], max_bytes: int = 16 << 20, max_body: int | None = None
    ) -> None:
        self.engine = engine
        self.factory = factory
        self.max_bytes = max_bytes
        # by default a body over an eighth of the budget is served without being kept: a few huge results
        # would otherwise push out every other job's answer
        self.max_body = max_bytes // 8 if max_body is None else max_body
        self.bytes = 0
        self.loads = 0  # whole-row loads, for tests: a poll of an unchanged job adds none
        self._kept: OrderedDict[str, tuple[str, datetime, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def body(self, tenant: str, job_id: str) -> bytes:
        """The job's JSON as `JobOut`. Blocking: call it on a thread."""
        with self.engine.connect() as conn:
            row = conn.execute(_VERSION, {"job_id": job_id}).first()
        if row is None or row.tenant != tenant:
            self._forget(job_id)
            raise service.no_such_job(job_id)  # another tenant's job answers like a missing one
        with self._lock:
            kept = self._kept.get(job_id)
            if kept is not None and kept[0] == tenant and kept[1] == row.updated_at:
                self._kept.move_to_end(job_id)
                return kept[2]
        return self._load(tenant, job_id)

    def _load(self, tenant: str, job_id: str) -> bytes:
        with self.factory() as session:
            job = service.get_job(session, tenant, job_id)
            version = job.updated_at
            body = JobOut.model_validate(job).model_dump_json().encode()
        with self._lock:
            self.loads += 1
            self._drop(job_id)
            if len(body) <= self.max_body:
                self._kept[job_id] = (tenant, version, body)
                self.bytes += len(body)
                while self.bytes > self.max_bytes:
                    self._drop(next(iter(self._kept)))
        return body

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        kept = self._kept.pop(job_id, None)
        if kept is not None:
            self.bytes -= len(kept[2])
