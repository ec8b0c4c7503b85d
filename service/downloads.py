"""Stored files as HTTP downloads: streamed from storage, with `ETag`/`If-None-Match` (304) and a
single `Range` (206, or 416 when it does not fit), or a 307 to a presigned URL when the operator
asked for it. Callers check the tenant before they get here."""

from __future__ import annotations

import re

from fastapi import Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from service.errors import ServiceError
from service.schemas import error_responses
from service.storage import Storage

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

DOWNLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "The part named by the `Range` header."},
    304: {"description": "Not modified: `If-None-Match` named the file's ETag (its sha256)."},
    **error_responses(404, 416),
}


def _matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) of a single `bytes=` range; None for the whole file (no, several or
    unreadable ranges may be answered with the whole file); ValueError when it cannot be met."""
    match = RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            raise ValueError
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise ValueError
    return start, end


def download(
    request: Request,
    storage: Storage,
    key: str,
    *,
    size: int,
    sha256: str,
    media_type: str,
    filename: str,
    headers: dict[str, str] | None = None,
    presign_s: int | None = None,
) -> Response:
    etag = f'"{sha256}"'
    if presign_s is not None:
        url = storage.presigned_url(key, expires_s=presign_s, filename=filename)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    common = {
        **(headers or {}),
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    inm = request.headers.get("if-none-match")
    if inm is not None and _matches(inm, etag):
        return Response(status_code=304, headers=common)
    span = None
    raw = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if raw is not None and (if_range is None or if_range.strip() == etag):
        try:
            span = _byte_range(raw, size)
        except ValueError:
            raise ServiceError(
                f"The requested range {raw!r} lies outside the file of {size} bytes; ask for bytes 0-{size - 1} "
                "at most.",
                code="range_not_satisfiable",
                status=416,
                detail={"size_bytes": size, "range": raw},
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
    if span is None:
        return StreamingResponse(
            storage.iter_bytes(key), media_type=media_type, headers={**common, "Content-Length": str(size)}
        )
    start, end = span
    return StreamingResponse(
        storage.iter_bytes(key, start=start, end=end),
        status_code=206,
        media_type=media_type,
        headers={**common, "Content-Length": str(end - start + 1), "Content-Range": f"bytes {start}-{end}/{size}"},
    )
