"""resend_backlog_messages / resend_duplicates / resend_drain_s: a backlog that outwaits the resend
interval. 1,000 jobs are queued and no worker takes them for three intervals of QAAS_QUEUED_RESEND_S
(2 s here) while the sweep runs every QAAS_SWEEP_INTERVAL_S (0.5 s), as the workers' sweep would; then
two workers drain the queue, the sweep still running. The baseline is the rule before, in the same run the
same way: every job queued and untouched for the interval sent again, every interval.

On the embedded default (SQLite, the filesystem broker) in a scratch data dir. The workers are Celery
workers with the service's queue configuration whose task claims the job and records it as done without
running an engine (`bench/resend_worker.py`), so draining costs what the queue costs; a duplicate costs
one failed claim.
- resend_backlog_messages: run messages in the broker when the workers start;
- resend_duplicates: deliveries whose claim failed (the job had already run), over the whole drain;
- resend_drain_s: from the first claim until every job has run and the queue is empty."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from bench.common import ROOT, Context
from bench.harness import clean_env
from bench.results import Baseline, Measurement
from service.database import make_engine, make_session_factory, transaction, utcnow
from service.migrate import upgrade
from service.queue import QUEUE, JobQueue
from service.settings import Settings
from service.tables import Job, OnnxModel
from worker.reaper import sweep

JOBS = 1000
RESEND_S = 2.0
SWEEP_S = 0.5
INTERVALS = 3
WORKERS = 2
DRAIN_TIMEOUT_S = 600.0
Factory = sessionmaker[Session]
Sweep = Callable[[Factory, Callable[[str], None], Settings], None]


def old_rule(factory: Factory, send: Callable[[str], None], settings: Settings) -> None:
    """The sweep's rule before: every job queued and untouched for QAAS_QUEUED_RESEND_S sent again, then touched."""
    cutoff = utcnow() - timedelta(seconds=settings.queued_resend_s)
    with factory() as session:
        stale = list(session.scalars(select(Job.id).where(Job.status == "queued", Job.updated_at < cutoff)))
    for job_id in stale:
        send(job_id)
        with transaction(factory) as session:
            session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(updated_at=utcnow()))


def new_rule(factory: Factory, send: Callable[[str], None], settings: Settings) -> None:
    """The workers' sweep as it is (worker/reaper.py)."""
    sweep(factory, send, settings)


def _queue_jobs(factory: Factory, queue: JobQueue, count: int) -> list[str]:
    with transaction(factory) as session:
        model = OnnxModel(
            name="m",
            storage_prefix="models/bench",
            file_name="model.onnx",
            sha256="0" * 64,
            size_bytes=1,
            ir_version=8,
            opset=13,
            producer="bench",
            inputs=[],
            outputs=[],
            op_counts={},
            external_data=[],
        )
        session.add(model)
        session.flush()
        jobs = [Job(model_id=model.id, recipe={"mode": "dynamic"}, evaluation={}) for _ in range(count)]
        session.add_all(jobs)
        session.flush()
        ids = [job.id for job in jobs]
    for job_id in ids:  # as the API does, after the commit
        queue.enqueue(job_id)
    return ids


def _messages(settings: Settings) -> int:
    return len(list((settings.broker_dir / "queue").glob(f"*.{QUEUE}.msg")))


def _deliveries(settings: Settings) -> list[str]:
    return [
        line.split()[1]
        for path in settings.resolved_data_dir.glob("deliveries-*.txt")
        for line in path.read_text().splitlines()
        if line.strip()
    ]


@contextlib.contextmanager
def _workers(settings: Settings, logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = clean_env(QAAS_DATA_DIR=str(settings.resolved_data_dir), QAAS_LOG_LEVEL="warning")
    procs = []
    for n in range(WORKERS):
        argv = [sys.executable, "-m", "celery", "-A", "bench.resend_worker", "worker", "-P", "solo", "-Q", QUEUE]
        argv += ["-n", f"resend{n}@%h", "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with (logs / f"worker-{n}.log").open("ab") as log:
            procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def arm(ctx: Context, name: str, rule: Sweep, jobs: int) -> dict[str, Any]:
    """One backlog, then its drain, under `rule`."""
    root = ctx.dir(f"resend-{name}")
    settings = Settings(data_dir=root / "var", queued_resend_s=RESEND_S, sweep_interval_s=SWEEP_S)
    upgrade(settings)
    factory = make_session_factory(make_engine(settings))
    queue = JobQueue(settings)
    resent = 0

    def send(job_id: str) -> None:
        nonlocal resent
        queue.enqueue(job_id)
        resent += 1

    try:
        _queue_jobs(factory, queue, jobs)
        ctx.log(f"   {name}: {jobs} jobs queued; no worker for {INTERVALS} x {RESEND_S:g} s")
        until = time.monotonic() + INTERVALS * RESEND_S + SWEEP_S / 2
        while time.monotonic() < until:
            rule(factory, send, settings)
            time.sleep(SWEEP_S)
        backlog = _messages(settings)
        resent_in_backlog = resent
        ctx.log(f"   {name}: {backlog} messages in the broker; {WORKERS} workers start")

        stop = threading.Event()

        def keep_sweeping() -> None:
            while not stop.wait(SWEEP_S):
                rule(factory, send, settings)

        sweeper = threading.Thread(target=keep_sweeping, name="bench-sweep", daemon=True)
        sweeper.start()
        try:
            with _workers(settings, root):
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while True:
                    with factory() as session:
                        waiting = session.scalar(
                            select(func.count()).select_from(Job).where(Job.status.in_(("queued", "running")))
                        )
                    if not waiting and _messages(settings) == 0 and len(_deliveries(settings)) >= jobs + resent:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: not drained after {DRAIN_TIMEOUT_S:g} s")
                    time.sleep(0.1)
                drained_at = utcnow()
        finally:
            stop.set()
            sweeper.join(30)
        with factory() as session:
            first = session.scalar(select(func.min(Job.started_at)))
            attempts = set(session.scalars(select(Job.attempts).distinct()))
        deliveries = _deliveries(settings)
        assert first is not None
        return {
            "jobs": jobs,
            "backlog_messages": backlog,
            "resent_during_backlog": resent_in_backlog,
            "resent_in_all": resent,
            "delivered": len(deliveries),
            "claimed": deliveries.count("claimed"),
            "duplicates": deliveries.count("duplicate"),
            "drain_s": round((drained_at - first).total_seconds(), 2),
            "attempts_per_job": sorted(attempts),
        }
    finally:
        queue.close()
        factory.kw["bind"].dispose()


def run(ctx: Context) -> dict[str, Measurement]:
    jobs = 100 if ctx.quick else JOBS
    old = arm(ctx, "old-rule", old_rule, jobs)
    new = arm(ctx, "new-rule", new_rule, jobs)
    details = {
        "resend_s": RESEND_S,
        "sweep_s": SWEEP_S,
        "intervals": INTERVALS,
        "workers": WORKERS,
        "new_rule": new,
        "old_rule": old,
    }
    errors = [
        f"{name}: {arm['claimed']} of {jobs} jobs claimed, attempts {arm['attempts_per_job']}"
        for name, arm in (("new rule", new), ("old rule", old))
        if arm["claimed"] != jobs or arm["attempts_per_job"] != [1]
    ]
    what = (
        f"{jobs:,} queued jobs, no worker for {INTERVALS} resend intervals ({RESEND_S:g} s, a sweep every "
        f"{SWEEP_S:g} s), then {WORKERS} workers (filesystem broker)"
    )
    rule_before = "the rule before (sent again each interval)"

    def ratio(key: str) -> float | None:
        return round(new[key] / old[key], 3) if old[key] else None

    return {
        "resend_backlog_messages": Measurement(
            what=f"{what}: run messages in the broker when the workers start",
            unit="messages",
            value=new["backlog_messages"],
            baseline=Baseline(what=rule_before, value=old["backlog_messages"]),
            ratio=ratio("backlog_messages"),
            target="one per job",
            met=new["backlog_messages"] == jobs,
            errors=errors,
            details=details,
        ),
        "resend_duplicates": Measurement(
            what=f"{what}: duplicate deliveries (failed claims) until drained",
            unit="messages",
            value=new["duplicates"],
            baseline=Baseline(what=rule_before, value=old["duplicates"]),
            errors=errors,
        ),
        "resend_drain_s": Measurement(
            what=f"{what}: time from the first claim until every job ran and the queue is empty",
            unit="s",
            value=new["drain_s"],
            baseline=Baseline(what=rule_before, value=old["drain_s"]),
            ratio=ratio("drain_s"),
            errors=errors,
        ),
    }
