"""Wire shapes shared by every router: errors and paginated lists."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from core.errors import ErrorInfo
from service.errors import ServiceError

T = TypeVar("T")

# For the report page and every download: nothing is fetched, run or framed, and no browser guesses a
# type other than the one sent (a stored file is never rendered as HTML from our origin).
LOCKED_DOWN_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ErrorBody(BaseModel):
    error: ErrorInfo


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page; null on the last.")


class OrmModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, all in the contract's error shape."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS.get(status, "Error")} for status in statuses}


_DESCRIPTIONS = {
    400: "The request cannot be read: a `cursor` this API did not return (`invalid_request`), a body that is "
    "not UTF-8 (`bad_request`)",
    401: "Missing or invalid API key (`unauthorized`)",
    403: "The credentials are valid but not for this endpoint (`forbidden`)",
    404: "No such resource (`not_found`; another tenant's resources answer the same)",
    409: "Conflicts with the resource's state (`conflict`)",
    413: "Body or upload too large (`payload_too_large`), or the storage quota is used up (`quota_exceeded`)",
    422: "Invalid input (`invalid_request`, `invalid_recipe`, `invalid_target`, `invalid_model`, `invalid_dataset`...)",
    429: "Too many requests, uploads in progress or active jobs (`rate_limited`; see `Retry-After`)",
    503: "The database, broker or storage is unavailable (`unavailable`); retry shortly",
}


def encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, row_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None:  # every cursor this API writes carries its UTC offset
            raise ValueError("naive timestamp")
        return created_at, row_id
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(
            "The cursor is not one this API returned; pass `next_cursor` from the previous page unchanged.",
            code="invalid_request",
            status=400,
            detail={"cursor": cursor},
        ) from exc


def error_response(
    status: int,
    code: str,
    message: str,
    detail: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The contract's error body; also an ASGI app, for middleware that answers before the router."""
    return JSONResponse(
        {"error": {"code": code, "message": message, "detail": detail or {}}},
        status_code=status,
        headers=headers,
    )
