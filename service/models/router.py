"""HTTP endpoints of /v1/models."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from service.auth import TenantDep
from service.deps import SessionDep, SettingsDep, StorageDep
from service.models import service
from service.models.schemas import ModelOut
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from service.schemas import LOCKED_DOWN_HEADERS, Page, error_responses
from service.tables import OnnxModel

router = APIRouter(prefix="/v1/models", tags=["models"])


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
    "the answer lists its inputs, outputs and operators.",
    responses=error_responses(413, 422, 429),
)
def upload_model(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="The .onnx file.")],
    external_data: Annotated[
        list[UploadFile],
        File(
            default_factory=list,
            description="External data files named as the model refers to them, or one .zip of them.",
        ),
        BeforeValidator(_only_files),
    ],
    name: Annotated[str, Form(max_length=255, description="Empty: the file name.")] = "",
) -> ModelOut:
    row = service.create_model(session, storage, settings, tenant, file, external_data, name)
    return ModelOut.model_validate(row)


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
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(404)},
)
def download_model(session: SessionDep, storage: StorageDep, tenant: TenantDep, model_id: str) -> StreamingResponse:
    row = service.get_model(session, tenant, model_id)
    key = f"{row.storage_prefix}/{row.file_name}"
    return StreamingResponse(
        storage.iter_bytes(key),
        media_type="application/octet-stream",
        headers={
            **LOCKED_DOWN_HEADERS,
            "Content-Disposition": f'attachment; filename="{row.id}.onnx"',
            "Content-Length": str(storage.size(key)),
        },
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
