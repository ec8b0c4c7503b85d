"""Wire shapes shared by every router: errors and paginated lists."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from service.errors import ServiceError

T = TypeVar("T")


class ErrorInfo(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["No model with id 7d0c... exists."])
    detail: dict[str, Any] = Field(default_factory=dict)


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
    400: "Bad request",
    401: "Missing or invalid API key (`unauthorized`)",
    403: "The credentials are valid but not for this endpoint (`forbidden`)",
    404: "No such resource (`not_found`; another tenant's resources answer the same)",
    409: "Conflicts with the resource's state (`conflict`)",
    413: "Body or upload too large, or over the storage quota (`payload_too_large`)",
    422: "Invalid input (`invalid_request`, `invalid_recipe`, `invalid_model`, `invalid_dataset`...)",
    429: "Too many requests for this key, or too many active jobs (`rate_limited`; see `Retry-After`)",
    503: "The database, broker or storage is unavailable (`unavailable`); retry shortly",
}


def encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, row_id = raw.split("|", 1)
        return datetime.fromisoformat(stamp), row_id
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(
            "The cursor is not one this API returned; pass `next_cursor` from the previous page unchanged.",
            code="invalid_request",
            status=400,
            detail={"cursor": cursor},
        ) from exc
