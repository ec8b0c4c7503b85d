"""HTTP endpoints of /v1/models."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service.auth import TenantDep
from service.deps import SessionDep, SettingsDep, StorageDep
from service.downloads import DOWNLOAD_RESPONSES, download
from service.models import service
from service.models.schemas import ModelOut
from service.models.uploads import service as uploads
from service.models.uploads.schemas import SHA256
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from service.schemas import LOCKED_DOWN_HEADERS, Page, error_responses
from service.storage import ObjectWriter
from service.tables import OnnxModel, new_id
from service.upload_stream import MAX_FIELDS_BYTES, NAME_FIELD, Form, binary, multipart_body, read_form
from service.uploads import discard, staging_dir

router = APIRouter(prefix="/v1/models", tags=["models"])
SHA256_BY_NAME = TypeAdapter(dict[str, Annotated[str, StringConstraints(pattern=SHA256)]])


def _only_files(value: Any) -> Any:
    """Keep the file parts of `external_data`. A text part carries no file: it is what a form tool sends
    for a file field left empty (Swagger UI sends the word `string`), so it is dropped, not refused."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if v is not None and not isinstance(v, str)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload an ONNX model",
    description="Multipart upload of a `.onnx` file, with optional external-data files (or one `.zip` of "
    "them) for models that keep weights outside the protobuf. The model is checked and inspected; "
    "the answer lists its inputs, outputs and operators.\n\n"
    "Or, on a service that keeps its files in an object store, the `.onnx` with the `upload_id` of an upload "
    "whose files went straight to the store (`POST /v1/uploads`): its parts are checked, the model is checked "
    "exactly the same way, and the parts become the model's external-data files.",
    responses=error_responses(404, 409, 413, 422, 429),
    openapi_extra=multipart_body(
        "Body_upload_model",
        {
            "file": binary("File", "The .onnx file."),
            "external_data": {
                "type": "array",
                "items": {"type": "string", "contentMediaType": "application/octet-stream"},
                "title": "External Data",
                "description": "External data files named as the model refers to them, or one .zip of them. "
                "Text parts under this name carry no file (a form tool sends one for a field left empty) "
                "and are ignored.",
            },
            "name": NAME_FIELD,
            "upload_id": {
                "type": "string",
                "title": "Upload Id",
                "description": "The id of an upload to the object store (`POST /v1/uploads`) that holds the "
                "external data; instead of `external_data`.",
                "default": "",  # Swagger UI would otherwise send its placeholder "string" as an id
            },
            "external_data_sha256": {
                "type": "string",
                "title": "External Data Sha256",
                "description": "With `upload_id`: a JSON object of each uploaded file's SHA-256 (lower-case hex), "
                "for files whose sha256 the upload did not declare. A file without one is read back once by the "
                "service to hash it. A file whose bytes differ from its sha256 fails its jobs (`input_corrupt`). "
                'For example `{"model.onnx.data": "9f86d0...0a08"}` (no example value: Swagger UI would send it).',
                "default": "",
            },
        },
        ["file"],
    ),
)
async def upload_model(
    request: Request, session: SessionDep, storage: StorageDep, settings: SettingsDep, tenant: TenantDep
) -> ModelOut:
    # The body is parsed here, in one pass, not by FastAPI (see service.upload_stream). The model is
    # staged for inspection (onnx.checker reads a file). External data, which is only checked by its
    # size, goes straight into storage: plain files under the model's keys, a .zip beside them, to be
    # read in place and have its files streamed out into storage (service.create_model).
    model_id = new_id()
    direct: list[str] = []

    def straight_to_storage(field: str, filename: str, index: int) -> ObjectWriter | None:
        key = service.external_data_key(model_id, filename, index) if field == "external_data" else None
        if key is None:
            return None
        direct.append(key)
        return storage.writer(key)

    try:
        with staging_dir(settings) as folder:
            form = await read_form(
                request,
                folder,
                max_file_bytes=settings.max_model_bytes,
                what={"file": "model file", "external_data": "external data"},
                max_lengths={"name": 255},
                direct=straight_to_storage,
                max_files=service.MAX_FILES_PER_UPLOAD,
                field_bytes={"external_data_sha256": MAX_FIELDS_BYTES},
            )
            upload_id = form.field("upload_id")
            if upload_id:
                row = await run_in_threadpool(
                    uploads.complete_upload,
                    session,
                    storage,
                    settings,
                    tenant,
                    upload_id,
                    form.file("file"),
                    _uploaded_sha256(form),
                    form.field("name") or "",
                )
                return ModelOut.model_validate(row)
            if form.field("external_data_sha256"):
                raise _invalid("external_data_sha256", "goes with `upload_id` only (files sent here are hashed here)")
            row = await run_in_threadpool(
                service.create_model,
                session,
                storage,
                settings,
                tenant,
                form.file("file"),
                form.files.get("external_data", []),
                form.field("name") or "",
                model_id,
            )
            return ModelOut.model_validate(row)
    except BaseException:
        if direct:  # a refused or broken upload keeps nothing
            await discard(storage, service.model_prefix(model_id))
            await discard(storage, service.archives_prefix(model_id))
        raise


def _invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": None}])


def _uploaded_sha256(form: Form) -> dict[str, str]:
    """`external_data_sha256`, read; an upload's files come from the store, never also from the form."""
    if form.files.get("external_data"):
        raise _invalid("upload_id", "send the external data either in the upload or as `external_data`, not both")
    text = form.field("external_data_sha256")
    if not text:
        return {}
    try:
        return SHA256_BY_NAME.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _invalid(
            "external_data_sha256",
            f"a JSON object of file name -> sha256 (64 lower-case hex digits) ({where or 'the value'}: {first['msg']})",
        ) from exc


@router.get("", summary="List models, newest first")
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query()] = None,
) -> Page[ModelOut]:
    rows, next_cursor = paginate(session, service.list_models_query(tenant), OnnxModel, limit, cursor)
    return Page[ModelOut](items=[ModelOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{model_id}", summary="Get one model", responses=error_responses(404))
def get_model(session: SessionDep, tenant: TenantDep, model_id: str) -> ModelOut:
    return ModelOut.model_validate(service.get_model(session, tenant, model_id))


@router.get(
    "/{model_id}/file",
    summary="Download the uploaded .onnx file",
    description="Supports `Range` (206) and `If-None-Match` with the model's ETag, its sha256 (304).",
    response_class=StreamingResponse,
    responses=DOWNLOAD_RESPONSES,
)
def download_model(
    request: Request, session: SessionDep, storage: StorageDep, tenant: TenantDep, model_id: str
) -> Response:
    row = service.get_model(session, tenant, model_id)
    key = f"{row.storage_prefix}/{row.file_name}"
    return download(
        request,
        storage,
        key,
        size=storage.size(key),
        sha256=row.sha256,
        media_type="application/octet-stream",
        filename=f"{row.id}.onnx",
        headers=LOCKED_DOWN_HEADERS,
    )


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a model and its files",
    description="Refused with 409 while a queued or running job uses the model.",
    responses=error_responses(404, 409),
)
def delete_model(session: SessionDep, storage: StorageDep, tenant: TenantDep, model_id: str) -> Response:
    service.delete_model(session, storage, tenant, model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
