"""The FastAPI application: lifespan-owned engine, storage and queue; one error shape for everything."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import RuleError
from service import openapi
from service.auth import AuthMiddleware
from service.database import make_engine, make_session_factory
from service.datasets.router import router as datasets_router
from service.errors import ServiceError, from_rule
from service.inspection import isolation as inspection_isolation
from service.jobs.events import EventHub
from service.jobs.polling import PolledJobs
from service.jobs.router import router as jobs_router
from service.limits import BodyLimitMiddleware
from service.models.router import router as models_router
from service.models.uploads.router import router as uploads_router
from service.openapi import document_errors, operation_id
from service.ops.metrics import ApiMetrics
from service.ops.middleware import RequestContextMiddleware
from service.ops.router import router as ops_router
from service.orphans import start_sweep
from service.queue import JobQueue
from service.schemas import error_response
from service.settings import Settings, get_settings
from service.storage import open_storage
from service.targets.router import router as targets_router
from service.throttle import open_throttle
from service.uploads import sweep_staging
from service.usage.router import router as usage_router

log = logging.getLogger("service")

DESCRIPTION = """
Upload an ONNX model and calibration data, start a quantization job, poll it, download
`quantized.onnx`, and read what it cost: size, latency, fidelity and accuracy side by side.

1. `POST /v1/models` with the `.onnx` file.
2. `POST /v1/datasets` with a `.npz` (one array per input) or `.npy`.
3. `POST /v1/jobs` with the two ids and a recipe.
4. `GET /v1/jobs/{id}` until `status` is `succeeded`, then `GET /v1/jobs/{id}/artifacts/quantized.onnx`.

A model whose weights live in large external-data files, on a service that keeps its files in S3: `POST
/v1/uploads` hands out presigned URLs of their parts, the bytes go to the object store directly, then
`POST /v1/models` with the `.onnx` and the `upload_id`.

Every error answers `{"error": {"code", "message", "detail"}}`.
"""


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part not in ("body",)) or "body"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for e in exc.errors():
        field = _location(tuple(e.get("loc", ())))
        rule = (e.get("ctx") or {}).get("error")
        if isinstance(rule, RuleError):  # a recipe rule: its own sentence and the field it names
            field = ".".join(p for p in (field, rule.detail.get("field")) if p)
            errors.append({"field": field, "message": rule.message, "type": rule.code})
        else:
            errors.append({"field": field, "message": str(e.get("msg", "")), "type": e.get("type")})
    in_recipe = bool(errors) and all(e["field"].startswith("recipe") for e in errors)
    in_target = bool(errors) and all(e["field"].startswith("target") for e in errors)
    first = errors[0] if errors else {"field": "body", "message": "invalid request", "type": None}
    code = "invalid_recipe" if in_recipe else "invalid_target" if in_target else "invalid_request"
    if first["type"] in ("invalid_recipe", "invalid_target"):
        message = str(first["message"])
    else:
        message = f"Invalid value for `{first['field']}`: {first['message']}."
    return error_response(422, code, message, {"field": first["field"], "errors": errors})


async def _rule_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RuleError)
    return await _service_error(request, from_rule(exc))


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers or None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}
    message = {
        404: f"No endpoint at {request.url.path}; see /docs for the API.",
        405: f"{request.method} is not allowed on {request.url.path}; see /docs.",
    }.get(exc.status_code, str(exc.detail))
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI reading a JSON body
        message = f"The request body is not UTF-8 ({exc.__cause__.reason}); send the JSON body encoded as UTF-8."
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "bad_request"),
        message,
        headers=getattr(exc, "headers", None),
    )


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return error_response(503, "unavailable", "The database is unreachable; retry in a few seconds.")


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    """An OSError that reaches the app comes from the file storage (or the staging area beside it):
    a volume that is unmounted, read-only, full or not answering. 503, like the database."""
    assert isinstance(exc, OSError)
    log.warning("file storage unavailable on %s %s", request.method, request.url.path, exc_info=exc)
    reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    message = "The file storage is unavailable; retry in a few seconds."
    return error_response(503, "unavailable", message, {"reason": reason})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "Something went wrong on our side; the error was logged.")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        storage = open_storage(settings)
        queue = JobQueue(settings)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.polled_jobs = PolledJobs(engine, app.state.session_factory)
        app.state.storage = storage
        app.state.queue = queue
        app.state.throttle = open_throttle(settings)  # AuthMiddleware's rates and slots: Redis or this process
        app.state.db_limiter = anyio.CapacityLimiter(8)  # commits and closes; see service.deps
        app.state.event_hub = EventHub(
            app.state.session_factory,
            settings.events_poll_s,
            settings.events_progress_s,
            settings.events_max_stream_s,
            settings.events_key_check_s,
        )
        # uvicorn's own variable: the proxies whose X-Forwarded-For it believes (service.api turns proxy headers on).
        proxy_problem = settings.untrusted_proxy_problem(os.environ.get("FORWARDED_ALLOW_IPS"))
        if proxy_problem:
            log.warning("%s", proxy_problem)
        app.state.metrics = ApiMetrics(app.state.session_factory, lambda: app.state.event_hub.open_streams)
        inspection_isolation.start()  # uploads are inspected in its children, not in this process
        sweep_staging(settings)  # what uploads left when an API on this data folder died mid-request
        # ... and in storage, where no row points at it (on a thread: a large store takes a while to list)
        app.state.orphan_sweep = start_sweep(app.state.session_factory, storage, settings.orphan_grace_s)
        try:
            yield
        finally:
            app.state.orphan_sweep.stop.set()
            await anyio.to_thread.run_sync(app.state.orphan_sweep.thread.join, 2)
            await app.state.event_hub.close()
            await app.state.throttle.aclose()
            queue.close()
            engine.dispose()

    # Swagger UI (/docs) and ReDoc (/redoc) with their JS and CSS served from the installed
    # fastapi-offline package: the pages work on a machine without internet access.
    app = FastAPIOffline(
        title="QaaS: ONNX quantization as a service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
    )
    # Innermost first. BodyLimit and Auth answer from the request head, before any body byte is read: the
    # caller's key, rate and upload slots (AuthMiddleware), then the body's declared or counted size.
    # RequestContext is outermost: every answer, their refusals included, is timed and carries a request id.
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(openapi.DocsPolicyMiddleware)
    app.add_middleware(RequestContextMiddleware)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RuleError, _rule_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(PoolTimeout, _database_down)
    app.add_exception_handler(OSError, _storage_down)
    app.add_exception_handler(Exception, _internal)
    routers = (models_router, uploads_router, datasets_router, jobs_router, targets_router, usage_router, ops_router)
    for router in routers:
        document_errors(router.routes)
        app.include_router(router)
    openapi.install(app)
    return app
