"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service.auth import operator
from service.schemas import error_responses

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


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
    summary="Prometheus metrics (operator token when auth is on)",
    description="Request durations by route, jobs by status, queue depth and job durations by mode and status, "
    "in the Prometheus text format. With auth on (or `QAAS_METRICS_TOKEN` set) it needs "
    "`Authorization: Bearer <QAAS_METRICS_TOKEN>`: it spans tenants, so a tenant's key gets 403.",
    response_class=PlainTextResponse,
    dependencies=[Depends(operator)],
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(401, 403),
    },
)
async def metrics(request: Request) -> Response:
    body = await anyio.to_thread.run_sync(request.app.state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
