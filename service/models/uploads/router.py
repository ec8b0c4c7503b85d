"""HTTP endpoints of /v1/uploads: external data sent straight to the object store (S3 storage only)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response, status

from service.auth import TenantDep
from service.deps import SessionDep, SettingsDep, StorageDep
from service.models.uploads import service
from service.models.uploads.schemas import GIB, PartOut, UploadCreate, UploadFileOut, UploadOut
from service.schemas import error_responses
from service.storage import Storage
from service.tables import Upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

CREATE_EXAMPLES: dict[str, Any] = {
    "one_file": {
        "summary": "One external-data file",
        "value": {"files": [{"name": "model.onnx.data", "size_bytes": 3 * GIB}]},
    },
    "with_sha256": {
        "summary": "Several files, their sha256 known beforehand",
        "value": {
            "files": [
                {
                    "name": "encoder.bin",
                    "size_bytes": 1 * GIB,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                },
                {
                    "name": "decoder.bin",
                    "size_bytes": 512 << 20,
                    "sha256": "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752",
                },
            ]
        },
    },
}


def _out(storage: Storage, row: Upload) -> UploadOut:
    parts = service.parts(storage, row)
    return UploadOut(
        id=row.id,
        status=row.status,
        model_id=row.model_id if row.status == "completed" else None,
        created_at=row.created_at,
        expires_at=row.expires_at,
        files=[
            UploadFileOut(
                name=f["name"],
                size_bytes=f["size_bytes"],
                sha256=f["sha256"],
                parts=[PartOut(**asdict(part)) for part in parts[f["name"]]],
            )
            for f in row.files
        ],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Start an upload of external data straight to the object store",
    description="For models whose weights live in external-data files, on a service that keeps its files in "
    "S3-compatible storage: declare the files (names as the model refers to them, sizes, optionally sha256) and "
    "get presigned URLs of their parts. `PUT` each part's bytes (exactly `size_bytes` of them, from `offset` in the "
    "file) to its URL, without the API key; then `POST /v1/models` with the `.onnx` as `file` and this upload's "
    "`id` as `upload_id` (and, when not declared here, each file's sha256 in `external_data_sha256`). The model is "
    "checked exactly as a model uploaded with its external data. What the files declare counts against the storage "
    "quota until the upload is completed, deleted, or expires (`expires_at`; then its parts are removed). "
    "On a service that keeps its files itself this answers 409 `direct_uploads_unavailable`: send the external "
    "data with the model to `POST /v1/models` instead.",
    responses=error_responses(409, 413, 422),
)
def create_upload(
    body: Annotated[UploadCreate, Body(openapi_examples=CREATE_EXAMPLES)],
    response: Response,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> UploadOut:
    row = service.create_upload(session, storage, settings, tenant, body.files)
    response.headers["Location"] = f"/v1/uploads/{row.id}"
    return _out(storage, row)


@router.get(
    "/{upload_id}",
    summary="Get an upload and its part URLs",
    description="The part URLs again (valid until `expires_at`), to resend a part; once the upload is completed, "
    "`model_id` names its model and no URLs are given.",
    responses=error_responses(404),
)
def get_upload(session: SessionDep, storage: StorageDep, tenant: TenantDep, upload_id: str) -> UploadOut:
    return _out(storage, service.get_upload(session, tenant, upload_id))


@router.delete(
    "/{upload_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Abandon an upload",
    description="Aborts its multipart uploads in the store (the parts sent are removed) and frees its quota. "
    "Refused with 409 once it is completed (delete the model instead).",
    responses=error_responses(404, 409),
)
def delete_upload(session: SessionDep, storage: StorageDep, tenant: TenantDep, upload_id: str) -> Response:
    service.delete_upload(session, storage, tenant, upload_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
