"""Multipart uploads read in one pass: python-multipart's streaming parser writes each file part
straight into the request's staging folder, counting and hashing it on the way.

Starlette's own form parsing spools every file part to a temporary file first, which the service
then copied into staging: every upload was written to disk twice. Here the body is written once.
Parsing and writing run on a worker thread, fed in batches of about a megabyte, so the event loop
never blocks on the disk.

The routes that use it declare their form in OpenAPI with `multipart_body` (FastAPI would otherwise
parse the body itself before the route runs), and missing or malformed fields answer 422 exactly
as FastAPI's own validation does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import PayloadTooLarge
from service.storage import BesideHash, ObjectWriter

BATCH_BYTES = 1 << 20
QUEUED = 4
MAX_FIELD_BYTES = 64 << 10
# A form's text fields are held in memory: all of them together at most this much. File parts are
# written as they come (to staging or straight into storage): at most MAX_FILE_PARTS of them, refused
# at the first one over, before it is written.
MAX_FIELDS_BYTES = 1 << 20
MAX_FILE_PARTS = 1000


@dataclass
class StagedPart:
    """One uploaded file, already at `path` in the staging folder; or, when its bytes went straight
    to storage, stored under `stored_key` (nothing at `path`)."""

    filename: str
    path: Path
    size_bytes: int = 0
    sha256: str = ""
    stored_key: str | None = None


# (field, filename, index of the file in the form) -> a writer the part's bytes go to, or None: staging
Direct = Callable[[str, str, int], ObjectWriter | None]


@dataclass
class Form:
    files: dict[str, list[StagedPart]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def file(self, name: str) -> StagedPart:
        return self.files[name][0]

    def field(self, name: str) -> str | None:
        return self.fields.get(name)


def _invalid(name: str, kind: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", name), "msg": message, "input": None}])


class _Parts:
    """python-multipart's callbacks: headers collected per part, file data written as it comes."""

    def __init__(
        self,
        folder: Path,
        max_file_bytes: int,
        what: dict[str, str],
        direct: Direct | None,
        max_files: int,
        field_bytes: dict[str, int] | None = None,
    ) -> None:
        self.folder = folder
        self.field_bytes = field_bytes or {}
        self.direct = direct
        self._writer: ObjectWriter | None = None
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.what = what
        self.form = Form()
        self.total = 0
        self.text_total = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header = [b"", b""]
        self._name = ""
        self._text: bytearray | None = None
        self._file: BinaryIO | None = None
        self._part: StagedPart | None = None
        self._digest: BesideHash | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda d, s, e: self._header.__setitem__(0, self._header[0] + d[s:e]),
            "on_header_value": lambda d, s, e: self._header.__setitem__(1, self._header[1] + d[s:e]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    @property
    def open_part(self) -> bool:
        return self._file is not None or self._writer is not None or self._text is not None

    def part_begin(self) -> None:
        self._headers = []

    def header_end(self) -> None:
        self._headers.append((self._header[0].lower(), self._header[1]))
        self._header = [b"", b""]

    def headers_finished(self) -> None:
        disposition = next((v for k, v in self._headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise _invalid("body", "value_error", 'every part needs a Content-Disposition with a "name"')
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
            count = sum(len(v) for v in self.form.files.values())
            if count >= self.max_files:
                raise PayloadTooLarge(
                    f"The upload holds more than {self.max_files} files, the most one upload may have; send the "
                    "model's external data in fewer files (or one .zip of them), and no other file parts.",
                    detail={"limit_files": self.max_files},
                    headers={"Connection": "close"},  # the rest of the body is not worth reading
                )
            part = StagedPart(filename, self.folder / f"part-{count}")
            self._writer = self.direct(self._name, filename, count) if self.direct else None
            self._part, self._digest = part, BesideHash()
            if self._writer is None:
                self._file = part.path.open("xb")
            self.form.files.setdefault(self._name, []).append(part)
        else:
            self._part, self._text = None, bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = memoryview(data)[start:end]
        if self._part is not None:
            self.total += len(chunk)
            if self.total > self.max_file_bytes:
                what = self.what.get(self._name, self._name)
                raise PayloadTooLarge(
                    f"The {what} is larger than the limit of {self.max_file_bytes} bytes; upload a "
                    "smaller file or ask the operator to raise the limit.",
                    detail={"limit_bytes": self.max_file_bytes},
                    headers={"Connection": "close"},  # the rest of the body is not worth reading
                )
            self._part.size_bytes += len(chunk)
            if self._writer is not None:
                self._writer.write(chunk)  # hashes as it goes
                return
            assert self._file is not None and self._digest is not None
            self._digest.update(chunk)  # beside the write
            self._file.write(chunk)
        elif self._text is not None:
            limit = self.field_bytes.get(self._name, MAX_FIELD_BYTES)
            if len(self._text) + len(chunk) > limit:
                raise _invalid(self._name, "string_too_long", f"at most {limit} bytes")
            self.text_total += len(chunk)
            if self.text_total > MAX_FIELDS_BYTES:
                raise PayloadTooLarge(
                    f"The form's text fields hold more than {MAX_FIELDS_BYTES} bytes in all; send only the "
                    "fields the endpoint documents.",
                    detail={"limit_bytes": MAX_FIELDS_BYTES},
                    headers={"Connection": "close"},
                )
            self._text += chunk

    def part_end(self) -> None:
        if self._part is not None and self._writer is not None:
            stored = self._writer.commit()
            self._writer = None
            self._part.sha256, self._part.stored_key = stored.sha256, stored.key
        elif self._part is not None and self._file is not None:
            self._file.close()
            self._file = None
            assert self._digest is not None
            self._part.sha256 = self._digest.hexdigest()
            self._digest = None
        elif self._text is not None:
            self.form.fields[self._name] = self._text.decode("utf-8", "replace")
            self._text = None

    def close(self) -> None:
        if self._writer is not None:  # the request broke off inside this part
            self._writer.abort()
            self._writer = None
        if self._digest is not None:
            self._digest.cancel()
        if self._file is not None:
            self._file.close()


async def read_form(
    request: Request,
    folder: Path,
    *,
    max_file_bytes: int,
    what: dict[str, str],
    required: tuple[str, ...] = ("file",),
    max_lengths: dict[str, int] | None = None,
    direct: Direct | None = None,
    max_files: int = MAX_FILE_PARTS,
    field_bytes: dict[str, int] | None = None,
) -> Form:
    """Parse the request's multipart body, its files into `folder` (which the caller removes), or
    into the writers `direct` gives for them. The files together may hold `max_file_bytes`, in at
    most `max_files` parts; `what` names each file field in messages. A text field holds at most
    MAX_FIELD_BYTES, or what `field_bytes` allows it (all of them together MAX_FIELDS_BYTES)."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise _invalid(required[0], "missing", "Field required (send the body as multipart/form-data)")
    parts = _Parts(folder, max_file_bytes, what, direct, max_files, field_bytes)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())  # type: ignore[arg-type]
    try:
        await _pipe(request, parser)
        if parts.open_part:
            raise FormParserError("the body ends inside a part")
    except FormParserError as exc:
        raise _invalid("body", "value_error", f"the multipart body is malformed ({exc})") from exc
    finally:
        parts.close()
    form = parts.form
    for name in required:
        if name not in form.files:
            raise _invalid(name, "missing", "Field required")
    for name, limit in (max_lengths or {}).items():
        value = form.fields.get(name)
        if value is not None and len(value) > limit:
            raise _invalid(name, "string_too_long", f"String should have at most {limit} characters")
    return form


async def _pipe(request: Request, parser: MultipartParser) -> None:
    """Receive the body on the event loop while a worker thread parses and writes what came
    before: the network and the disk overlap. Batches of BATCH_BYTES, at most QUEUED of them
    waiting, so memory stays bounded whatever the client sends."""
    send, receive = anyio.create_memory_object_stream[list[bytes]](QUEUED)
    producer_failed: list[BaseException] = []

    async def produce() -> None:
        async with send:
            batch: list[bytes] = []
            size = 0
            try:
                async for chunk in request.stream():
                    batch.append(chunk)  # no copies: the parser reads each chunk where it is
                    size += len(chunk)
                    if size >= BATCH_BYTES:
                        await send.send(batch)
                        batch, size = [], 0
            except BaseException as exc:
                producer_failed.append(exc)
                raise
            await send.send(batch)

    def consume() -> None:
        while True:
            try:
                batch = anyio.from_thread.run(receive.receive)
            except anyio.EndOfStream:
                break
            for chunk in batch:
                parser.write(chunk)
        if not producer_failed:
            parser.finalize()

    try:
        async with anyio.create_task_group() as group, receive:
            group.start_soon(produce)
            await anyio.to_thread.run_sync(consume)
    except BaseExceptionGroup as errors:
        first: BaseException = errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


# The forms of the routes that read their body with `read_form`, as FastAPI would have documented
# them: `add_form_schemas` puts them in the OpenAPI document's components.
FORM_SCHEMAS: dict[str, dict[str, Any]] = {}
NAME_FIELD = {
    "type": "string",
    "maxLength": 255,
    "title": "Name",
    "description": "Empty: the file name.",
    "default": "",
}


def multipart_body(title: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its multipart form with `read_form`."""
    FORM_SCHEMAS[title] = {"properties": properties, "type": "object", "required": required, "title": title}
    schema = {"$ref": f"#/components/schemas/{title}"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def add_form_schemas(document: dict[str, Any]) -> dict[str, Any]:
    document.setdefault("components", {}).setdefault("schemas", {}).update(FORM_SCHEMAS)
    return document


def binary(title: str, description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "title": title,
        "description": description,
    }
