"""Request body limits at the ASGI edge, before FastAPI spools anything to disk or memory.

A request whose `Content-Length` is over its endpoint's limit is answered 413 `payload_too_large`
without reading a byte of the body. Every other body is counted as it arrives (chunked uploads
have no `Content-Length`), and the request ends with the same 413 once the count passes the
limit: the multipart parser then closes (and so deletes) the temporary files it spooled the parts
into, and the route, which stages files under the data dir, never runs.

Uploads may be as large as their setting (`QAAS_MAX_MODEL_BYTES`, `QAAS_MAX_DATASET_BYTES`) plus
`MULTIPART_ALLOWANCE` for the multipart framing and the small form fields; the services still
check each file against the exact limit. Every other request body (JSON) is capped at
`OTHER_BODY_LIMIT`, because those bodies are read into memory whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

MULTIPART_ALLOWANCE = 4 << 20
OTHER_BODY_LIMIT = 16 << 20


@dataclass(frozen=True)
class BodyLimit:
    limit_bytes: int  # what the client is told: the setting
    allowed_bytes: int  # what is accepted on the wire: the setting plus the framing allowance
    what: str
    setting: str | None


class BodyTooLarge(Exception):
    """Raised into the application from `receive` once a body has passed its limit."""


@dataclass
class _Progress:
    received: int = 0
    exceeded: bool = False
    response_started: bool = False
    refused: bool = False


class BodyLimitMiddleware:
    """Pure ASGI middleware: `app.add_middleware(BodyLimitMiddleware, settings=settings)`."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.uploads = {
            "/v1/models": BodyLimit(
                settings.max_model_bytes,
                settings.max_model_bytes + MULTIPART_ALLOWANCE,
                "a model upload (the model and its external data together)",
                "QAAS_MAX_MODEL_BYTES",
            ),
            "/v1/datasets": BodyLimit(
                settings.max_dataset_bytes,
                settings.max_dataset_bytes + MULTIPART_ALLOWANCE,
                "a dataset upload",
                "QAAS_MAX_DATASET_BYTES",
            ),
        }
        self.other = BodyLimit(OTHER_BODY_LIMIT, OTHER_BODY_LIMIT, "this request", None)

    def limit_for(self, scope: Scope) -> BodyLimit:
        if scope.get("method") == "POST":
            return self.uploads.get(route_path(scope), self.other)
        return self.other

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit.allowed_bytes:
            await _refuse(send, limit, declared)
            return
        progress = _Progress()

        async def counted_receive() -> Message:
            if progress.exceeded:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                progress.received += len(message.get("body", b""))
                if progress.received > limit.allowed_bytes:
                    progress.exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if progress.exceeded:
                # Whatever the application answers to the cut body (FastAPI: 400, "error parsing the
                # body"), the client gets the 413 instead.
                if not progress.response_started and not progress.refused:
                    progress.refused = True
                    await _refuse(send, limit, None)
                return
            if message["type"] == "http.response.start":
                progress.response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not progress.exceeded:
                raise
        if progress.exceeded and not progress.refused and not progress.response_started:
            progress.refused = True
            await _refuse(send, limit, None)


def route_path(scope: Scope) -> str:
    """The request's path below the app's root, without a trailing slash."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # h11 refuses a malformed Content-Length before the app sees the request


async def _refuse(send: Send, limit: BodyLimit, declared: int | None) -> None:
    advice = f"ask the operator to raise {limit.setting}" if limit.setting else "send a smaller body"
    detail: dict[str, int] = {"limit_bytes": limit.limit_bytes}
    if declared is not None:
        detail["content_length"] = declared
    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"The request body is larger than the limit of {limit.limit_bytes} bytes for "
                f"{limit.what}; upload a smaller file or {advice}.",
                "detail": detail,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is not worth reading: the connection is closed after this answer.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
