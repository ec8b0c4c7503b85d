"""API keys, the caller's tenant, and the per-key request rate limit.

A key looks like `qaas_<8 hex>_<43 url-safe chars>`; `qaas_<8 hex>` is its visible prefix (shown in
lists and logs), and only the sha256 of the whole key is stored. Keys carry 256 random bits, so a
fast hash is enough; the comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import logs
from service.database import utcnow
from service.errors import Forbidden, NotFound, ServiceError
from service.settings import Settings
from service.tables import DEFAULT_TENANT, ApiKey

KEY_PREFIX = "qaas_"
bearer = HTTPBearer(auto_error=False, description="An API key made with `python -m service.admin create-key`.")


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"


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
    """A token bucket per key in this API process: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self.lock:
            tokens, stamp = self.buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate


def current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    settings: Settings = request.app.state.settings
    if settings.auth == "off":
        return DEFAULT_TENANT
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("This endpoint needs an API key: send `Authorization: Bearer <key>`.", headers=challenge)
    with request.app.state.session_factory() as session:
        found = tenant_for_key(session, credentials.credentials)
    if found is None:
        raise Unauthorized("The API key is unknown or revoked; ask your operator for a valid key.", headers=challenge)
    tenant, prefix = found
    logs.current().tenant = tenant
    wait = request.app.state.rate_limiter.acquire(prefix)
    if wait:
        raise RateLimited(
            f"Too many requests for this API key (limit {settings.rate_limit_per_minute} per minute); "
            f"retry in {wait:.1f} s.",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            detail={"retry_after_s": round(wait, 2)},
        )
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


def operator(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Endpoints that span tenants (/metrics): the operator token `QAAS_METRICS_TOKEN`, never a tenant's key.
    Open only while auth is off and no token is set."""
    settings: Settings = request.app.state.settings
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token is None and settings.auth == "off":
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized(
            "This endpoint needs the operator token: send `Authorization: Bearer <token>`.", headers=challenge
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
    raise Unauthorized("The operator token is wrong.", headers=challenge)
