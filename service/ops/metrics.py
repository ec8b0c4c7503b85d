"""Prometheus metrics of one API process: request durations by route (measured here), and what the
database says about every tenant's jobs (read at scrape time, so every API replica reports the same):
jobs by status, queue depth, and job durations by mode and status."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.lifecycle import JobStatus
from service.database import utcnow
from service.tables import Dataset, Job, OnnxModel

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
ENDED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)


class ApiMetrics:
    """Made by the app's lifespan; the request middleware calls `observe`, GET /metrics `render`."""

    def __init__(self, session_factory: sessionmaker[Session], open_streams: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.started = time.time()
        self.durations = Histogram(
            "qaas_http_request_duration_seconds",
            "Time to answer an HTTP request (to the end of its body), by route template.",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "qaas_http_requests",
            "HTTP requests answered, by method and status.",
            ["method", "status"],
            registry=self.registry,
        )
        Gauge("qaas_uptime_seconds", "Seconds since the API process started.", registry=self.registry).set_function(
            lambda: time.time() - self.started
        )
        Gauge(
            "qaas_event_streams", "Open job event streams (GET /v1/jobs/{id}/events).", registry=self.registry
        ).set_function(open_streams)
        self.registry.register(DatabaseCollector(session_factory))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.durations.labels(method, route, str(status)).observe(seconds)
        self.requests.labels(method, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _duration_s(session: Session) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


class DatabaseCollector(Collector):
    """Read at each scrape: a few aggregate queries, whatever the number of jobs."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("qaas_database_up", "1 when the database answered this scrape.")
        try:
            with self.session_factory() as session:
                families = list(self._families(session))
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, session: Session) -> Iterator[Any]:
        by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
        jobs = GaugeMetricFamily("qaas_jobs", "Jobs by status, all tenants.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED.value))
        yield GaugeMetricFamily("qaas_queue_depth", "Jobs waiting for a worker.", value=by_status.get("queued", 0))
        yield GaugeMetricFamily(
            "qaas_queue_oldest_seconds",
            "Age of the oldest queued job (0 when none waits).",
            value=(utcnow() - oldest).total_seconds() if oldest else 0.0,
        )
        for name, table in (("models", OnnxModel), ("datasets", Dataset)):
            count = session.scalar(select(func.count()).select_from(table).where(table.deleted_at.is_(None)))
            yield GaugeMetricFamily(f"qaas_{name}", f"Stored {name}, all tenants.", value=count or 0)
        yield self._job_durations(session)

    def _job_durations(self, session: Session) -> HistogramMetricFamily:
        """Start to end of each ended job's last attempt, by recipe mode and final status."""
        duration = _duration_s(session)
        mode = Job.recipe["mode"].as_string()
        query = (
            select(
                mode,
                Job.status,
                func.count(),
                func.coalesce(func.sum(duration), 0.0),
                *(func.sum(case((duration <= bound, 1), else_=0)) for bound in JOB_BUCKETS),
            )
            .where(Job.status.in_(ENDED), Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .group_by(mode, Job.status)
        )
        family = HistogramMetricFamily(
            "qaas_job_duration_seconds",
            "Duration of ended jobs (their last attempt), by mode and status.",
            labels=["mode", "status"],
        )
        for row in session.execute(query):
            job_mode, status, count, total, *cumulative = row
            buckets = [(str(bound), float(n or 0)) for bound, n in zip(JOB_BUCKETS, cumulative, strict=True)]
            family.add_metric([job_mode or "unknown", status], [*buckets, ("+Inf", float(count))], float(total))
        return family
