"""API keys, the caller's tenant, the per-key request rate limit and the cap on uploads in flight.

A key looks like `qaas_<8 hex>_<43 url-safe chars>`; `qaas_<8 hex>` is its visible prefix (shown in
lists and logs), and only the sha256 of the whole key is stored. Keys carry 256 random bits, so a
fast hash is enough; the comparison is constant-time.

`AuthMiddleware` decides from the request head alone, before a byte of the body is read: a client
without a valid key, over its rate, or with too many uploads or event streams open costs one small
answer, never a parsed multipart body. Requests without a valid key are counted per client address;
past the limit, only a key this process found valid recently is still looked up, so a flood of
made-up keys costs no query and holds back no known tenant. A key's rate and slots and an address's
failures are counted across every API process when the broker is Redis (`service/throttle.py`). Routes read
the tenant it found through `TenantDep`."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service import logs
from service.database import utcnow
from service.errors import Forbidden, NotFound, RateLimited, ServiceError, Unauthorized, Unavailable
from service.limits import route_path
from service.schemas import error_response
from service.settings import Settings
from service.tables import DEFAULT_TENANT, ApiKey
from service.throttle import Cap, ProcessCap, Rate, Throttle

log = logging.getLogger(__name__)

KEY_PREFIX = "qaas_"
bearer = HTTPBearer(auto_error=False, description="An API key made with `python -m service.admin create-key`.")
# Served to anybody, with auth on or off: liveness, readiness and the API's own description (the docs
# pages' scripts and styles included).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/static-offline-docs/",)
# Takes the operator token, never a tenant's key (`AuthMiddleware._operator`).
METRICS_PATH = "/metrics"
UPLOAD_PATHS = frozenset({"/v1/models", "/v1/datasets"})
UPLOAD_RETRY_AFTER_S = 5
EVENTS_PATH = re.compile(r"/v1/jobs/[^/]+/events")
STREAM_RETRY_AFTER_S = 10  # streams last long: a slot frees when one of them ends
# Hashes of keys found valid, kept this long: over the failure limit, only these are still looked up.
KNOWN_KEY_TTL_S = 3600.0
KNOWN_KEYS_MAX = 10_000
CHALLENGE = {"WWW-Authenticate": "Bearer"}
NO_KEY = "This endpoint needs an API key: send `Authorization: Bearer <key>`."
UNKNOWN_KEY = "The API key is unknown or revoked; ask your operator for a valid key."
NO_OPERATOR_TOKEN = "This endpoint needs the operator token: send `Authorization: Bearer <token>`."

PREFIX_LENGTH = len(KEY_PREFIX) + 8


def key_prefix(key: str) -> str | None:
    """The visible `qaas_<8 hex>` part of a well-formed key (the secret may itself contain `_`)."""
    if not key.startswith(KEY_PREFIX) or len(key) <= PREFIX_LENGTH + 1 or key[PREFIX_LENGTH] != "_":
        return None
    return key[:PREFIX_LENGTH]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    key: str
    row: ApiKey


def create_key(session: Session, tenant: str, name: str = "") -> NewKey:
    prefix = f"{KEY_PREFIX}{secrets.token_hex(4)}"
    key = f"{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(prefix=prefix, key_sha256=hash_key(key), tenant=tenant, name=name)
    session.add(row)
    session.flush()
    return NewKey(key, row)


def revoke_key(session: Session, prefix_or_id: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where((ApiKey.prefix == prefix_or_id) | (ApiKey.id == prefix_or_id)))
    if row is None:
        raise NotFound(f"No API key {prefix_or_id!r}.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def unrevoked_prefixes(session: Session, prefixes: Collection[str]) -> set[str]:
    """Which of these key prefixes belong to keys that exist and are not revoked."""
    if not prefixes:
        return set()
    query = select(ApiKey.prefix).where(ApiKey.prefix.in_(list(prefixes)), ApiKey.revoked_at.is_(None))
    return set(session.scalars(query))


def tenant_for_key(session: Session, key: str) -> tuple[str, str] | None:
    """(tenant, prefix) of a valid, unrevoked key; None otherwise."""
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None:
        # Still hash, so unknown and known prefixes take the same time.
        hmac.compare_digest(hash_key(key), "0" * 64)
        return None
    if not hmac.compare_digest(hash_key(key), row.key_sha256):
        return None
    return row.tenant, row.prefix


class KnownKeys:
    """The sha256 of keys this process found valid in the last `ttl_s`, the `max_size` most recent."""

    def __init__(self, ttl_s: float = KNOWN_KEY_TTL_S, max_size: int = KNOWN_KEYS_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self.expiry: OrderedDict[str, float] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, digest: str) -> None:
        with self.lock:
            self.expiry[digest] = time.monotonic() + self.ttl_s
            self.expiry.move_to_end(digest)
            while len(self.expiry) > self.max_size:
                self.expiry.popitem(last=False)

    def discard(self, digest: str) -> None:
        with self.lock:
            self.expiry.pop(digest, None)

    def known(self, digest: str) -> bool:
        with self.lock:
            expiry = self.expiry.get(digest)
            if expiry is not None and expiry < time.monotonic():
                del self.expiry[digest]
                return False
            return expiry is not None


def _lookup(factory: sessionmaker[Session], key: str) -> tuple[str, str] | None:
    with factory() as session:
        return tenant_for_key(session, key)


def _bearer_token(scope: Scope) -> str | None:
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _throttle(scope: Scope) -> Throttle:
    throttle: Throttle = scope["app"].state.throttle
    return throttle


def _wait_for(wait: float, message: str, **detail: str | int) -> RateLimited:
    """A rate limit's 429: `Retry-After` in whole seconds (at least 1), the exact wait in the detail."""
    return RateLimited(
        message,
        headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        detail={"retry_after_s": round(wait, 2), **detail},
    )


class AuthMiddleware:
    """Pure ASGI middleware: `app.add_middleware(AuthMiddleware, settings=settings)`.

    Every refusal is sent before the body is read, with `Connection: close` when the request has a
    body, so the server stops reading it too."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        # Counted by the app's throttle (made in its lifespan): across every API process when the broker is Redis.
        self.requests = Rate("requests", settings.rate_limit_per_minute)  # per API key
        self.failures = Rate("failures", settings.auth_failures_per_minute)  # per client address
        self.uploads = Cap("uploads", settings.uploads_in_flight_per_key)
        self.streams = Cap("streams", settings.events_max_per_key)
        # Counted in this process: what it can hold. With auth off there is no key, and only these hold (one
        # trusted local user, or a benchmark).
        self.uploads_here = ProcessCap(settings.uploads_in_flight)
        self.streams_here = ProcessCap(settings.events_max_per_process)
        self.known_keys = KnownKeys()  # in this process: a cache of its own lookups

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        try:
            if path == METRICS_PATH:
                await self._operator(scope)
                scope.setdefault("state", {})["operator"] = True
                await self.app(scope, receive, send)
                return
            tenant, prefix = await self._caller(scope)
        except ServiceError as exc:
            await self._refuse(scope, receive, send, exc)
            return
        state = scope.setdefault("state", {})
        state["tenant"], state["key_prefix"] = tenant, prefix
        logs.current().tenant = tenant  # the request's log context, bound by RequestContextMiddleware
        method = scope.get("method")
        if method == "POST" and path in UPLOAD_PATHS:
            cap, here, refusal = self.uploads, self.uploads_here, self._too_many_uploads
        elif method == "GET" and EVENTS_PATH.fullmatch(path):
            cap, here, refusal = self.streams, self.streams_here, self._too_many_streams
        else:
            await self.app(scope, receive, send)
            return
        if not here.take():
            await self._refuse(scope, receive, send, refusal("process"))
            return
        slot = None
        try:
            if prefix is not None:
                slot = await _throttle(scope).take(cap, prefix)
                if slot is None:
                    await self._refuse(scope, receive, send, refusal("key"))
                    return
            await self.app(scope, receive, send)
        finally:
            here.give()
            if slot is not None:
                with anyio.CancelScope(shield=True):  # a client that went away still gives its slot back
                    await _throttle(scope).give(slot)

    async def _caller(self, scope: Scope) -> tuple[str, str | None]:
        """(tenant, key prefix); the prefix is None with auth off. Raises the refusal."""
        if self.settings.auth == "off":
            return DEFAULT_TENANT, None
        tenant, prefix = await self._valid_key(scope, _bearer_token(scope))
        wait = await _throttle(scope).spend(self.requests, prefix)
        if wait:
            raise _wait_for(
                wait,
                f"Too many requests for this API key (limit {self.settings.rate_limit_per_minute} per minute); "
                f"retry in {wait:.1f} s.",
            )
        return tenant, prefix

    async def _valid_key(self, scope: Scope, token: str | None) -> tuple[str, str]:
        """(tenant, prefix) of a valid key, else Unauthorized, counted against the client's address. Past the
        address's limit only a key found valid recently is looked up (so revocation still holds at once); any
        other is refused with 429 before the database, so a flood of made-up keys costs no query."""
        address = _address(scope)
        digest = hash_key(token) if token is not None and key_prefix(token) is not None else None
        if digest is None or not self.known_keys.known(digest):
            wait = await _throttle(scope).wait(self.failures, address)
            if wait:
                limit = self.settings.auth_failures_per_minute
                raise _wait_for(
                    wait,
                    f"Too many requests without a valid API key from {address} (limit {limit} per minute); "
                    f"retry in {wait:.1f} s with a valid key.",
                    scope="address",
                )
        found = None
        if token is not None and digest is not None:
            factory: sessionmaker[Session] = scope["app"].state.session_factory
            try:
                found = await anyio.to_thread.run_sync(_lookup, factory, token)
            except (DBAPIError, PoolTimeout) as exc:  # any failure of one SELECT: unreachable
                log.warning("API key check: database unavailable: %s", exc)
                raise Unavailable("The database is unreachable; retry in a few seconds.") from exc
        if found is None:
            await _throttle(scope).spend(self.failures, address)
            if digest is not None:
                self.known_keys.discard(digest)
            raise Unauthorized(NO_KEY if token is None else UNKNOWN_KEY, headers=CHALLENGE)
        assert digest is not None
        self.known_keys.add(digest)
        return found

    async def _operator(self, scope: Scope) -> None:
        """/metrics: the operator token `QAAS_METRICS_TOKEN`, never a tenant's key (403). Open only while auth
        is off and no token is set. Anything else counts as a request without a valid key, like everywhere."""
        token = self.settings.metrics_token.get_secret_value() if self.settings.metrics_token else None
        if token is None and self.settings.auth == "off":
            return
        given = _bearer_token(scope)
        if token is not None and given is not None and hmac.compare_digest(given.encode(), token.encode()):
            return
        try:
            await self._valid_key(scope, given)
        except Unauthorized:
            message = NO_OPERATOR_TOKEN if given is None else "The operator token is wrong."
            raise Unauthorized(message, headers=CHALLENGE) from None
        raise Forbidden(
            "Metrics span every tenant, so a tenant's API key cannot read them; use the operator token "
            + ("(QAAS_METRICS_TOKEN)." if token else "(the operator must set QAAS_METRICS_TOKEN first)."),
        )

    def _too_many_uploads(self, which: str) -> RateLimited:
        if which == "key":
            limit, setting, whose = self.uploads.most, "QAAS_UPLOADS_IN_FLIGHT_PER_KEY", "for this API key"
        else:
            limit, setting, whose = self.uploads_here.most, "QAAS_UPLOADS_IN_FLIGHT", "on this server"
        return RateLimited(
            f"{limit} uploads are already in progress {whose}, the most allowed; wait for one to finish and "
            f"retry in {UPLOAD_RETRY_AFTER_S} s (the operator sets the limit with {setting}).",
            headers={"Retry-After": str(UPLOAD_RETRY_AFTER_S)},
            detail={"uploads_in_flight_limit": limit, "scope": which},
        )

    def _too_many_streams(self, which: str) -> RateLimited:
        if which == "key":
            limit, setting, whose = self.streams.most, "QAAS_EVENTS_MAX_PER_KEY", "for this API key"
        else:
            limit, setting, whose = self.streams_here.most, "QAAS_EVENTS_MAX_PER_PROCESS", "on this server"
        return _wait_for(
            STREAM_RETRY_AFTER_S,
            f"{limit} event streams are already open {whose}, the most allowed; close one or retry in "
            f"{STREAM_RETRY_AFTER_S} s (the operator sets the limit with {setting}).",
            scope=which,
            streams_limit=limit,
        )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, exc: ServiceError) -> None:
        headers = dict(exc.headers)
        request_headers = Headers(scope=scope)
        if request_headers.get("content-length", "0") != "0" or "transfer-encoding" in request_headers:
            headers["Connection"] = "close"  # the body stays unread, and the server stops reading it
        await error_response(exc.status, exc.code, exc.message, exc.detail, headers)(scope, receive, send)


async def current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The tenant `AuthMiddleware` found. `credentials` only puts the bearer scheme into OpenAPI
    (Swagger's Authorize button); the key was checked before the body was read."""
    tenant: str | None = getattr(request.state, "tenant", None)
    if tenant is None:  # fail closed: only reachable if the middleware is missing
        raise Unauthorized(NO_KEY, headers=CHALLENGE)
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


async def operator(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Endpoints that span tenants (/metrics): `AuthMiddleware` checked the operator token. `credentials` only
    puts the bearer scheme into OpenAPI."""
    if not getattr(request.state, "operator", False):  # fail closed: only reachable if the middleware is missing
        raise Unauthorized(NO_OPERATOR_TOKEN, headers=CHALLENGE)
