"""API keys, the caller's tenant, the per-key request rate limit and the cap on uploads in flight.

A key looks like `qaas_<8 hex>_<43 url-safe chars>`; `qaas_<8 hex>` is its visible prefix (shown in
lists and logs), and only the sha256 of the whole key is stored. Keys carry 256 random bits, so a
fast hash is enough; the comparison is constant-time.

`AuthMiddleware` decides from the request head alone, before a byte of the body is read: a client
without a valid key, over its rate, or with too many uploads in flight costs one small answer, never
a parsed multipart body. Routes read the tenant it found through `TenantDep`."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated

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

log = logging.getLogger(__name__)

KEY_PREFIX = "qaas_"
bearer = HTTPBearer(auto_error=False, description="An API key made with `python -m service.admin create-key`.")
# Served to anybody, with auth on or off: liveness, readiness and the API's own description (the docs
# pages' scripts and styles included). /metrics takes the operator token, never a tenant's key: its route
# checks it (`operator`).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/metrics"}
)
PUBLIC_PREFIXES = ("/static-offline-docs/",)
UPLOAD_PATHS = frozenset({"/v1/models", "/v1/datasets"})
UPLOAD_RETRY_AFTER_S = 5
CHALLENGE = {"WWW-Authenticate": "Bearer"}
NO_KEY = "This endpoint needs an API key: send `Authorization: Bearer <key>`."

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


class RateLimiter:
    """A token bucket per key in this API process: `per_minute` requests, refilled continuously.
    Buckets that refilled are dropped once there are more than `max_buckets` (keys may be client
    addresses, which a caller does not choose from a small set)."""

    def __init__(self, per_minute: int, max_buckets: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.max_buckets = max_buckets
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, stamp = self.buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - stamp) * self.rate)

    def acquire(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self.lock:
            tokens = self._tokens(key, now)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                self._prune(now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate

    def wait(self, key: str) -> float:
        """What `acquire` would answer, without taking a token."""
        with self.lock:
            tokens = self._tokens(key, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self.buckets) <= self.max_buckets:
            return
        for key in [k for k in self.buckets if self._tokens(k, now) >= self.capacity]:
            del self.buckets[key]  # full again: the same as no bucket
        if len(self.buckets) > self.max_buckets:  # still too many: the least recently used go
            for key, _ in sorted(self.buckets.items(), key=lambda kv: kv[1][1])[: len(self.buckets) // 2]:
                del self.buckets[key]


class UploadSlots:
    """Uploads in flight in this API process: at most `per_key` for one key and `per_process` in all.
    Each upload holds a slot from its request head to its answer, spooled parts and staging included."""

    def __init__(self, per_key: int, per_process: int) -> None:
        self.per_key = per_key
        self.per_process = per_process
        self.by_key: Counter[str] = Counter()
        self.total = 0
        self.lock = threading.Lock()

    def take(self, key: str | None) -> str | None:
        """None when a slot was taken, else which cap refused it ("key" or "process")."""
        with self.lock:
            if self.total >= self.per_process:
                return "process"
            if key is not None and self.by_key[key] >= self.per_key:
                return "key"
            self.total += 1
            if key is not None:
                self.by_key[key] += 1
            return None

    def give(self, key: str | None) -> None:
        with self.lock:
            self.total -= 1
            if key is not None:
                self.by_key[key] -= 1
                if self.by_key[key] <= 0:
                    del self.by_key[key]


def _lookup(factory: sessionmaker[Session], key: str) -> tuple[str, str] | None:
    with factory() as session:
        return tenant_for_key(session, key)


def _wait_for(wait: float, message: str, **detail: str) -> RateLimited:
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
        self.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
        self.failures = RateLimiter(settings.auth_failures_per_minute)  # per client address
        self.uploads = UploadSlots(settings.uploads_in_flight_per_key, settings.uploads_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        try:
            tenant, prefix = await self._caller(scope)
        except ServiceError as exc:
            await self._refuse(scope, receive, send, exc)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        logs.current().tenant = tenant  # the request's log context, bound by RequestContextMiddleware
        if scope.get("method") != "POST" or path not in UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        refused = self.uploads.take(prefix)
        if refused is not None:
            await self._refuse(scope, receive, send, self._too_many_uploads(refused))
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.uploads.give(prefix)

    async def _caller(self, scope: Scope) -> tuple[str, str | None]:
        """(tenant, key prefix); the prefix is None with auth off. Raises the refusal."""
        if self.settings.auth == "off":
            return DEFAULT_TENANT, None
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        wait = self.failures.wait(address)
        if wait:  # refused before any database lookup: a flood of made-up keys costs no query
            limit = self.settings.auth_failures_per_minute
            raise _wait_for(
                wait,
                f"Too many requests without a valid API key from {address} (limit {limit} per minute); "
                f"retry in {wait:.1f} s with a valid key.",
                scope="address",
            )
        try:
            return await self._tenant_of_key(scope)
        except Unauthorized:
            self.failures.acquire(address)
            raise

    async def _tenant_of_key(self, scope: Scope) -> tuple[str, str]:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(NO_KEY, headers=CHALLENGE)
        found = None
        if key_prefix(token) is not None:
            factory: sessionmaker[Session] = scope["app"].state.session_factory
            try:
                found = await anyio.to_thread.run_sync(_lookup, factory, token)
            except (DBAPIError, PoolTimeout) as exc:  # any failure of one SELECT: unreachable
                log.warning("API key check: database unavailable: %s", exc)
                raise Unavailable("The database is unreachable; retry in a few seconds.") from exc
        if found is None:
            raise Unauthorized(
                "The API key is unknown or revoked; ask your operator for a valid key.", headers=CHALLENGE
            )
        tenant, prefix = found
        wait = self.rate_limiter.acquire(prefix)
        if wait:
            raise _wait_for(
                wait,
                f"Too many requests for this API key (limit {self.settings.rate_limit_per_minute} per minute); "
                f"retry in {wait:.1f} s.",
            )
        return tenant, prefix

    def _too_many_uploads(self, which: str) -> RateLimited:
        if which == "key":
            limit, setting, whose = self.uploads.per_key, "QAAS_UPLOADS_IN_FLIGHT_PER_KEY", "for this API key"
        else:
            limit, setting, whose = self.uploads.per_process, "QAAS_UPLOADS_IN_FLIGHT", "on this server"
        return RateLimited(
            f"{limit} uploads are already in progress {whose}, the most allowed; wait for one to finish and "
            f"retry in {UPLOAD_RETRY_AFTER_S} s (the operator sets the limit with {setting}).",
            headers={"Retry-After": str(UPLOAD_RETRY_AFTER_S)},
            detail={"uploads_in_flight_limit": limit, "scope": which},
        )

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, exc: ServiceError) -> None:
        headers = dict(exc.headers)
        request_headers = Headers(scope=scope)
        if request_headers.get("content-length", "0") != "0" or "transfer-encoding" in request_headers:
            headers["Connection"] = "close"  # the body stays unread, and the server stops reading it
        await error_response(exc.status, exc.code, exc.message, exc.detail, headers)(scope, receive, send)


def current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The tenant `AuthMiddleware` found. `credentials` only puts the bearer scheme into OpenAPI
    (Swagger's Authorize button); the key was checked before the body was read."""
    tenant: str | None = getattr(request.state, "tenant", None)
    if tenant is None:  # fail closed: only reachable if the middleware is missing
        raise Unauthorized(NO_KEY, headers=CHALLENGE)
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


def operator(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Endpoints that span tenants (/metrics): the operator token `QAAS_METRICS_TOKEN`, never a tenant's key.
    Open only while auth is off and no token is set."""
    settings: Settings = request.app.state.settings
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token is None and settings.auth == "off":
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized(
            "This endpoint needs the operator token: send `Authorization: Bearer <token>`.", headers=CHALLENGE
        )
    if token is not None and hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        return
    with request.app.state.session_factory() as session:
        tenant_key = tenant_for_key(session, credentials.credentials) is not None
    if tenant_key:
        raise Forbidden(
            "Metrics span every tenant, so a tenant's API key cannot read them; use the operator token "
            + ("(QAAS_METRICS_TOKEN)." if token else "(the operator must set QAAS_METRICS_TOKEN first)."),
        )
    raise Unauthorized("The operator token is wrong.", headers=CHALLENGE)
