"""Targets: which classes and pools have live workers (GET /v1/targets), and where a job's messages go.
A job's `target` is checked against the live workers when it is created, and the queue of each name it
lists is stored on the job (`Job.queues`), so every later send (re-sends, hand-backs, measurements) goes
to the same place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.placement import ANY
from service.database import utcnow
from service.errors import InvalidTarget
from service.queue import class_queue, pool_queue
from service.settings import Settings
from service.tables import Job, Worker
from service.targets import workers
from service.targets.schemas import TargetClass, TargetPool, Targets, TargetWorker

# Classes and pools heard from within this long are listed (live or not), and named when a target is refused.
SEEN_WITHIN = timedelta(hours=1)


def list_targets(session: Session, settings: Settings) -> Targets:
    now = utcnow()
    seen = workers.seen_since(session, now - SEEN_WITHIN)
    live = {w.id for w in seen if workers.is_live(w, now, settings.worker_live_s)}
    by_class: dict[str, list[Worker]] = {}
    for worker in seen:
        by_class.setdefault(worker.worker_class, []).append(worker)
    classes = []
    for name, members in sorted(by_class.items()):
        alive = [w for w in members if w.id in live]
        newest = max(members, key=lambda w: w.last_seen_at)
        classes.append(
            TargetClass(
                name=name,
                architecture=newest.architecture,
                features=list(newest.features),
                pools=sorted({w.pool for w in alive if w.pool}),
                live_workers=len(alive),
                running=sum(w.running for w in alive),
                capacity=sum(w.concurrency for w in alive),
                last_seen_at=newest.last_seen_at,
                workers=[TargetWorker.model_validate({**_columns(w), "live": w.id in live}) for w in members],
            )
        )
    pools = []
    for pool in sorted({w.pool for w in seen if w.pool}):
        alive = [w for w in seen if w.pool == pool and w.id in live]
        pools.append(
            TargetPool(
                name=pool,
                classes=sorted({w.worker_class for w in alive}),
                live_workers=len(alive),
                running=sum(w.running for w in alive),
                capacity=sum(w.concurrency for w in alive),
            )
        )
    return Targets(
        live_within_s=settings.worker_live_s,
        seen_within_s=SEEN_WITHIN.total_seconds(),
        classes=classes,
        pools=pools,
    )


def _columns(worker: Worker) -> dict[str, object]:
    return {name: getattr(worker, name) for name in TargetWorker.model_fields if name != "live"}


@dataclass(frozen=True)
class Routing:
    """Where a new job's messages go: `queues[0]` runs it, the others measure it (None: any worker)."""

    queues: list[str] | None = None

    @property
    def measures_elsewhere(self) -> bool:
        return self.queues is not None and len(self.queues) > 1


def route(session: Session, settings: Settings, names: Sequence[str]) -> Routing:
    """The queues of a job's target (`core.placement.parse_target`'s names; none: any worker). Each name
    must be a class, else a pool, with a live worker; otherwise 422 `invalid_target`, naming the classes
    and pools that have one and those seen in the last hour without one."""
    if not names:
        return Routing()
    now = utcnow()
    seen = workers.seen_since(session, now - SEEN_WITHIN)
    live = [w for w in seen if workers.is_live(w, now, settings.worker_live_s)]
    classes = sorted({w.worker_class for w in live})
    pools = sorted({w.pool for w in live if w.pool})
    queues = [class_queue(n) if n in classes else pool_queue(n) if n in pools else "" for n in names]
    missing = [n for n, q in zip(names, queues, strict=True) if not q]
    if missing:
        gone = sorted(({w.worker_class for w in seen} | {w.pool for w in seen if w.pool}) - {*classes, *pools})
        listed = ", ".join(classes + pools) or "none"
        raise InvalidTarget(
            f"No live worker is of class or pool {', '.join(map(repr, missing))} (none has sent a heartbeat in "
            f"the last {settings.worker_live_s:g} s); live classes and pools: {listed}. Name one of them, or "
            f'"{ANY}"; GET /v1/targets lists them.',
            detail={"field": "target", "unknown": missing, "classes": classes, "pools": pools, "not_live": gone},
        )
    return Routing(queues)


def first_queue(queues: Sequence[str] | None) -> str | None:
    """The queue a job runs from, of the queues stored on it: its target's first (None: any worker's)."""
    return queues[0] if queues else None


def queue_of(session: Session, job_id: str) -> str | None:
    """The queue a job runs from (None: the default queue, or a job that no longer exists)."""
    return first_queue(session.scalar(select(Job.queues).where(Job.id == job_id)))
