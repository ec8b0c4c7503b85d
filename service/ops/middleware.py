"""The outermost request wrapper: a request id for every request (the caller's `X-Request-ID` or a new
one, echoed in the answer and bound to every log line), and the request's duration by route template."""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = logs.request_id_from(Headers(scope=scope).get(logs.REQUEST_ID_HEADER))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        started = time.perf_counter()
        try:
            with logs.bound(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            metrics = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                metrics.observe(scope["method"], template, status, time.perf_counter() - started)
