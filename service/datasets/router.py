"""HTTP endpoints of /v1/datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from service.auth import TenantDep
from service.datasets import service
from service.datasets.schemas import DatasetOut
from service.deps import SessionDep, SettingsDep, StorageDep
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from service.schemas import Page, error_responses
from service.storage import ObjectWriter
from service.tables import Dataset, new_id
from service.upload_stream import NAME_FIELD, binary, multipart_body, read_form
from service.uploads import discard, staging_dir

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

PREPROCESS_EXAMPLE = (
    '{"input": "input", "size": [224, 224], "layout": "NCHW", "color": "RGB", '
    '"scale": 0.00392, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload calibration or evaluation data",
    description="`.npz` with one array per model input (keyed by input name; optional `__labels__`), "
    "`.npy` for one-input models, or a `.zip` of JPEG/PNG images with a `preprocess` spec. "
    "Arrays of rank = input rank + 1 hold samples stacked on a new axis 0; arrays of the input's "
    "rank are split into batches; rank-0 arrays are fed with every sample.",
    responses=error_responses(413, 422, 429),
    openapi_extra=multipart_body(
        "Body_upload_dataset",
        {
            "file": binary("File", "The .npz, .npy or .zip file."),
            "name": NAME_FIELD,
            "preprocess": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "title": "Preprocess",
                "description": "JSON, for image archives only (ignored for arrays).",
                "examples": [PREPROCESS_EXAMPLE],
            },
        },
        ["file"],
    ),
)
async def upload_dataset(
    request: Request, session: SessionDep, storage: StorageDep, settings: SettingsDep, tenant: TenantDep
) -> DatasetOut:
    # The body is parsed here, in one pass, not by FastAPI (see service.upload_stream). The dataset's
    # bytes go straight into storage, hashed on the way, and are inspected there (ranged reads on
    # object storage): they never land on the API's disk. A refused or broken upload keeps nothing.
    dataset_id = new_id()
    taken: list[str] = []

    def straight_to_storage(field: str, filename: str, index: int) -> ObjectWriter | None:
        if field != "file" or taken:  # another part is staged, and ignored
            return None
        taken.append(service.upload_key(dataset_id))
        return storage.writer(taken[0])

    try:
        with staging_dir(settings) as folder:
            form = await read_form(
                request,
                folder,
                max_file_bytes=settings.max_dataset_bytes,
                what={"file": "dataset file"},
                max_lengths={"name": 255},
                direct=straight_to_storage,
            )
            row = await run_in_threadpool(
                service.create_dataset,
                session,
                storage,
                settings,
                tenant,
                form.file("file"),
                form.field("name") or "",
                form.field("preprocess"),
                dataset_id,
            )
            return DatasetOut.model_validate(row)
    except BaseException:
        if taken:  # a refused or broken upload keeps nothing
            await discard(storage, service.dataset_prefix(dataset_id))
        raise


@router.get("", summary="List datasets, newest first")
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query()] = None,
) -> Page[DatasetOut]:
    rows, next_cursor = paginate(session, service.list_datasets_query(tenant), Dataset, limit, cursor)
    return Page[DatasetOut](items=[DatasetOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", summary="Get one dataset", responses=error_responses(404))
def get_dataset(session: SessionDep, tenant: TenantDep, dataset_id: str) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(session, tenant, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset and its file",
    description="Refused with 409 while a queued or running job uses the dataset.",
    responses=error_responses(404, 409),
)
def delete_dataset(session: SessionDep, storage: StorageDep, tenant: TenantDep, dataset_id: str) -> Response:
    service.delete_dataset(session, storage, tenant, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
