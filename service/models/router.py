"""HTTP endpoints of /v1/models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from fastapi.responses import StreamingResponse

from service.auth import TenantDep
from service.deps import SessionDep, SettingsDep, StorageDep
from service.downloads import DOWNLOAD_RESPONSES, download
from service.models import service
from service.models.schemas import ModelOut
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from service.schemas import Page, error_responses
from service.tables import OnnxModel

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload an ONNX model",
    description="Multipart upload of a `.onnx` file, with optional external-data files (or one `.zip` of "
    "them) for models that keep weights outside the protobuf. The model is checked and inspected; "
    "the answer lists its inputs, outputs and operators.",
    responses=error_responses(413, 422),
)
def upload_model(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="The .onnx file.")],
    external_data: Annotated[
        list[UploadFile] | None,
        File(description="External data files named as the model refers to them, or one .zip of them."),
    ] = None,
    name: Annotated[str | None, Form(max_length=255, description="Defaults to the file name.")] = None,
) -> ModelOut:
    row = service.create_model(session, storage, settings, tenant, file, external_data or [], name)
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
