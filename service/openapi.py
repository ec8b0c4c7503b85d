"""What the OpenAPI document says beyond what each route declares: operation ids named after the
route functions (`create_job`, `get_job`), and the error answers every route of a kind can give,
all in the contract's `{"error": {code, message, detail}}` shape."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import current_tenant
from service.deps import _session
from service.schemas import ErrorBody, error_responses
from service.upload_stream import add_form_schemas


def operation_id(route: APIRoute) -> str:
    """The route function's name: `create_job`, `get_job`, `upload_model`..."""
    return route.name


def _calls(dependant: Dependant) -> set[Any]:
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


def document_errors(routes: Iterable[Any]) -> None:
    """Add to each route the errors that come from what it depends on, not from its own code:
    401 and 429 (an API key and its rate limit), 503 (the database), 422 (parameters and bodies that do
    not validate), 413 (bodies over the limit) and 400 (a `cursor` this API did not write, a JSON body
    that is not UTF-8). Statuses a route declares itself are kept. Give it a router's routes before the
    router is included."""
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        calls = _calls(route.dependant)
        statuses: list[int] = []
        if current_tenant in calls:
            statuses += [401, 429]
        if _session in calls:
            statuses.append(503)
        if route.dependant.path_params or route.dependant.query_params or route.dependant.header_params:
            statuses.append(422)
        if any(param.alias == "cursor" for param in route.dependant.query_params):
            statuses.append(400)  # service.schemas.decode_cursor
        if route.body_field is not None:
            statuses += [400, 413, 422]  # 400: FastAPI cannot decode the body
        for status, response in error_responses(*statuses).items():
            route.responses.setdefault(status, response)
        _errors_as_json(route)


def _errors_as_json(route: APIRoute) -> None:
    """FastAPI files an error `model` under the route's own media type; a route that answers HTML,
    a file or an event stream still answers its errors in JSON, so say so."""
    response_class = route.response_class
    media = None if isinstance(response_class, DefaultPlaceholder) else getattr(response_class, "media_type", None)
    if media in (None, "application/json"):
        return
    for status, response in route.responses.items():
        if response.get("model") is ErrorBody:
            route.responses[status] = {
                "description": response.get("description", "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            route.response_fields.pop(status, None)


def mark_file_arrays(schema: Any) -> Any:
    """Items of a list of uploaded files also get `format: binary` (OpenAPI 3.0's spelling, beside 3.1's
    `contentMediaType`): Swagger UI then offers a file picker per item, where it otherwise showed a text box
    pre-filled with random characters that every upload sent back as a bogus part."""
    if isinstance(schema, dict):
        items = schema.get("items")
        if schema.get("type") == "array" and isinstance(items, dict) and "contentMediaType" in items:
            items.setdefault("format", "binary")
        for value in schema.values():
            mark_file_arrays(value)
    elif isinstance(schema, list):
        for value in schema:
            mark_file_arrays(value)
    return schema


def install(app: FastAPI) -> None:
    """Post-process the generated document once, when it is first asked for."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = mark_file_arrays(add_form_schemas(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# The docs pages may load what the service itself serves, and nothing else: ReDoc's bundle links a logo
# on a CDN, which this policy stops before the browser tries the network. No page may frame them
# (clickjacking: a hidden Swagger UI with a persisted key under a decoy page): `frame-ancestors 'none'`,
# and `X-Frame-Options: DENY` for browsers that predate it.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")


class DocsPolicyMiddleware:
    """Adds `Content-Security-Policy: DOCS_POLICY` and `X-Frame-Options: DENY` to the answers of the docs pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in DOCS_PATHS:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", []),
                    (b"content-security-policy", DOCS_POLICY.encode()),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_policy)
