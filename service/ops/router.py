"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from service.auth import current_tenant
from service.tables import Dataset, Job, OnnxModel

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])
STARTED = time.time()


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database, broker and storage are reachable",
    responses={503: {"description": "At least one dependency is unreachable"}},
)
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, dict[str, Any]] = {}

    def probe(name: str, fn: Any) -> None:
        started = time.perf_counter()
        try:
            fn()
            checks[name] = {"ok": True}
        except Exception as exc:
            # The exception's text can name hosts, users and paths: it goes to the log, not to the caller.
            log.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
            checks[name] = {"ok": False, "error": f"The {name} is unreachable; the API's log has the details."}
        checks[name]["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)

    def database() -> None:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    probe("database", database)
    probe("broker", state.queue.check)
    probe("storage", state.storage.check)
    ready = all(c["ok"] for c in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(current_tenant)],
)
def metrics(request: Request) -> PlainTextResponse:
    lines = [
        "# HELP qaas_uptime_seconds Seconds since the API process started.",
        "# TYPE qaas_uptime_seconds gauge",
        f"qaas_uptime_seconds {time.time() - STARTED:.3f}",
        "# HELP qaas_http_requests_total HTTP requests answered, by method and status.",
        "# TYPE qaas_http_requests_total counter",
    ]
    for (method, code), count in sorted(request.app.state.request_counts.items()):
        lines.append(f'qaas_http_requests_total{{method="{method}",status="{code}"}} {count}')
    try:
        with request.app.state.session_factory() as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
            models = session.scalar(select(func.count()).select_from(OnnxModel).where(OnnxModel.deleted_at.is_(None)))
            datasets = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.deleted_at.is_(None)))
        lines += ["# HELP qaas_jobs Jobs by status.", "# TYPE qaas_jobs gauge"]
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            lines.append(f'qaas_jobs{{status="{status}"}} {by_status.get(status, 0)}')
        lines += [
            "# HELP qaas_models Stored models.",
            "# TYPE qaas_models gauge",
            f"qaas_models {models}",
            "# HELP qaas_datasets Stored datasets.",
            "# TYPE qaas_datasets gauge",
            f"qaas_datasets {datasets}",
            "# HELP qaas_database_up 1 when the database answered.",
            "# TYPE qaas_database_up gauge",
            "qaas_database_up 1",
        ]
    except Exception:
        lines += [
            "# HELP qaas_database_up 1 when the database answered.",
            "# TYPE qaas_database_up gauge",
            "qaas_database_up 0",
        ]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
