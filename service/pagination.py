"""Keyset pagination over (created_at, id), newest first."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from service.schemas import decode_cursor, encode_cursor

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def paginate(
    session: Session, query: Select[Any], entity: Any, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    if cursor:
        created_at, row_id = decode_cursor(cursor)
        query = query.where(
            or_(entity.created_at < created_at, and_(entity.created_at == created_at, entity.id < row_id))
        )
    rows = list(session.scalars(query.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, next_cursor
