"""Log lines and their context: with `QAAS_LOG_FORMAT=json` one JSON object per line, carrying the
request id (`X-Request-ID`, passed on to the job it creates), the tenant, the job id and the attempt
of whatever the line is about."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass
class LogContext:
    """Mutable on purpose: a request's context is bound once by the middleware, and the tenant is
    filled in later by the auth dependency, which runs in a worker thread with a copy of the context."""

    request_id: str | None = None
    tenant: str | None = None
    job_id: str | None = None
    attempt: int | None = None

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


_context: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar("qaas_log_context", default=None)


def current() -> LogContext:
    found = _context.get()
    return found if found is not None else LogContext()


@contextmanager
def bound(**values: Any) -> Iterator[LogContext]:
    """Every log line inside carries `values` (and what outer contexts bound)."""
    context = LogContext(**{**current().fields(), **values})
    token = _context.set(context)
    try:
        yield context
    finally:
        _context.reset(token)


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    if header and _VALID_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **current().fields(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ContextFilter(logging.Filter):
    """For the text format: ` [request_id=... job_id=...]` after the message when a context is bound."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound_fields = current().fields()
        record.context = " [" + " ".join(f"{k}={v}" for k, v in bound_fields.items()) + "]" if bound_fields else ""
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"


def configure(level: str, fmt: str) -> None:
    """The root logger's one handler (stderr) in the chosen format; uvicorn's and Celery's loggers
    propagate to it."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.addFilter(ContextFilter())
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is a log line too, in the same format
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
