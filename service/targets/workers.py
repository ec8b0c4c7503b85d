"""The `workers` table: each worker's heartbeat writes its row (class, pool, CPU, tasks running); the workers
heard from within QAAS_WORKER_LIVE_S are the live ones, which jobs may target."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from service.database import utcnow
from service.tables import Worker

# Rows of workers not heard from for this long are deleted (by any worker's heartbeat).
FORGET_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class Advert:
    """What one worker process says about itself at every heartbeat (`id` is new at every start)."""

    id: str
    hostname: str
    pid: int
    worker_class: str
    pool: str | None
    architecture: str
    features: tuple[str, ...]
    cores: int
    concurrency: int


def beat(session: Session, advert: Advert, running: int) -> None:
    """Record that the worker is alive now and runs `running` tasks; forget workers long gone."""
    now = utcnow()
    values = {
        "hostname": advert.hostname[:255],
        "pid": advert.pid,
        "worker_class": advert.worker_class,
        "pool": advert.pool,
        "architecture": advert.architecture[:32],
        "features": list(advert.features),
        "cores": advert.cores,
        "concurrency": advert.concurrency,
        "running": running,
        "last_seen_at": now,
        "stopped_at": None,
    }
    updated = session.execute(update(Worker).where(Worker.id == advert.id).values(**values))
    if not isinstance(updated, CursorResult) or updated.rowcount != 1:
        session.add(Worker(id=advert.id, started_at=now, **values))
    session.execute(delete(Worker).where(Worker.last_seen_at < now - FORGET_AFTER))


def stopped(session: Session, worker_id: str) -> None:
    """The worker stops taking tasks (a warm shutdown): from now on it is not live."""
    now = utcnow()
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=now, last_seen_at=now))


def seen_since(session: Session, since: datetime) -> list[Worker]:
    """Workers heard from since `since`, by class, then most recent first."""
    query = select(Worker).where(Worker.last_seen_at >= since)
    return list(session.scalars(query.order_by(Worker.worker_class, Worker.last_seen_at.desc(), Worker.id)))


def is_live(worker: Worker, now: datetime, live_s: float) -> bool:
    return worker.stopped_at is None and worker.last_seen_at >= now - timedelta(seconds=live_s)
