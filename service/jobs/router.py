"""HTTP endpoints of /v1/jobs: create, poll, cancel, report, artifacts."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from sse_starlette import EventSourceResponse

from core.lifecycle import JobStatus
from core.result import JobResult, upgrade_stored
from service import logs
from service.auth import TenantDep
from service.deps import QueueDep, SessionDep, SettingsDep, StorageDep
from service.downloads import DOWNLOAD_RESPONSES, download
from service.errors import Conflict
from service.jobs import events, service
from service.jobs.polling import PolledJobs
from service.jobs.schemas import JOB_EXAMPLES, ArtifactOut, JobCreate, JobOut
from service.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from service.reports.html import render_report_html
from service.schemas import LOCKED_DOWN_HEADERS, Page, error_responses
from service.tables import Job

log = logging.getLogger(__name__)
EVENTS_EXAMPLE = (
    'event: status\nid: 1764470000123456.0\ndata: {"job_id":"3f0e...","status":"running","stage":"calibrating",'
    '"progress":0.31,"attempts":1,"candidate":null}\n\n'
    'event: progress\nid: 1764470000123456.1\ndata: {"job_id":"3f0e...","status":"running","stage":"calibrating",'
    '"progress":0.31,"attempts":1,"candidate":null}\n\n'
    ": ping\n\n"
    'event: end\nid: 1764470004000000.2\ndata: {"id":"3f0e...","status":"succeeded", ...}\n\n'
)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a quantization job",
    description="Checks the recipe against the model and the datasets, then queues the job. Poll the "
    "`Location` it answers with. The same `Idempotency-Key` and body within 24 h return the same job.",
    responses=error_responses(404, 409, 413, 422, 429, 503),
)
def create_job(
    body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    response: Response,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
    queue: QueueDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    request_id = logs.current().request_id
    job = service.submit_job(session, storage, queue, settings, tenant, body, idempotency_key, request_id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.get("", summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Annotated[JobStatus | None, Query()] = None,
    model_id: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query()] = None,
) -> Page[JobOut]:
    rows, next_cursor = paginate(session, service.list_jobs_query(tenant, status, model_id), Job, limit, cursor)
    return Page[JobOut](items=[JobOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    summary="Get a job: status, stage, progress, result",
    response_model=JobOut,
    responses=error_responses(404, 503),  # 503: the database, read without `SessionDep`
)
async def get_job(request: Request, tenant: TenantDep, job_id: str) -> Response:
    # One trip to a thread (a sync endpoint with `SessionDep` takes two), and the answer is the one
    # serialized for this version of the row (service.jobs.polling): a client polling a job pays for every pass.
    polled: PolledJobs = request.app.state.polled_jobs
    body = await anyio.to_thread.run_sync(polled.body, tenant, job_id)
    return Response(body, media_type="application/json")


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a queued or running job",
    description="A queued job never starts; a running job's process is stopped within seconds.",
    responses=error_responses(404, 409),
)
def cancel_job(session: SessionDep, tenant: TenantDep, job_id: str) -> JobOut:
    return JobOut.model_validate(service.cancel_job(session, tenant, job_id))


@router.get(
    "/{job_id}/events",
    summary="Follow a job live (Server-Sent Events)",
    description="A `text/event-stream` of `status` events (each status change), `progress` events (stage, "
    "progress and, in mode auto, the candidate recipe k of n) and one `end` event whose data is the whole Job "
    "(result or error included), after which the stream closes. The first events give the current state. "
    "Each event carries an `id`: reconnect with `Last-Event-ID` to resume without repeats; a stream whose "
    "`end` was already delivered answers 204. A comment line is sent every `QAAS_EVENTS_HEARTBEAT_S` seconds "
    "so proxies keep the connection open. A stream ends without `end` after `QAAS_EVENTS_MAX_STREAM_S` seconds "
    "(reconnect with `Last-Event-ID`) or when its API key is revoked. At most `QAAS_EVENTS_MAX_PER_KEY` streams "
    "per API key and `QAAS_EVENTS_MAX_PER_PROCESS` in all are open at once; past that, 429 `rate_limited` with "
    "`Retry-After`.",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "The event stream. `status` and `progress` data: a JobEvent; `end` data: a Job.",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": EVENTS_EXAMPLE,
                }
            },
        },
        204: {"description": "The stream's `end` event was already delivered (`Last-Event-ID`): nothing is left."},
        **error_responses(404, 429),
    },
)
def job_events(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    job_id: str,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    job = service.get_job(session, tenant, job_id)
    first, updated_at = JobOut.model_validate(job), job.updated_at
    last_seen = events.parse_last_event_id(last_event_id)
    if first.status in events.TERMINAL and events.already_ended(events.Snapshot.of(first, updated_at).stamp, last_seen):
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    hub: events.EventHub = request.app.state.event_hub
    key: str | None = getattr(request.state, "key_prefix", None)  # AuthMiddleware's; None with auth off
    return EventSourceResponse(hub.stream(first, updated_at, last_seen, key), ping=settings.events_heartbeat_s)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an ended job and its artifacts",
    description="Removes the job, its report and every artifact (the quantized model included). Refused with "
    "409 `conflict` while the job is queued or running: cancel it first.",
    responses=error_responses(404, 409),
)
def delete_job(session: SessionDep, storage: StorageDep, tenant: TenantDep, job_id: str) -> Response:
    service.delete_job(session, storage, tenant, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{job_id}/report",
    summary="The job's result: sizes, latency, fidelity, accuracy",
    response_model=JobResult,
    responses=error_responses(404, 409),
)
def get_report(session: SessionDep, tenant: TenantDep, job_id: str) -> Response:
    job = service.get_job(session, tenant, job_id)
    if job.status != "succeeded" or job.result is None:
        raise Conflict(
            f"The job is {job.status}; its report exists once it has succeeded.",
            detail={"job_id": job_id, "status": job.status},
        )
    return JSONResponse(upgrade_stored(job.result))  # served as stored, like Job.result


@router.get(
    "/{job_id}/report.html",
    summary="The job's report as a page a person reads",
    response_class=HTMLResponse,
    responses=error_responses(404),
)
def get_report_html(session: SessionDep, tenant: TenantDep, job_id: str) -> HTMLResponse:
    job = JobOut.model_validate(service.get_job(session, tenant, job_id)).model_dump(mode="json")
    return HTMLResponse(render_report_html(job), headers=LOCKED_DOWN_HEADERS)


@router.get("/{job_id}/artifacts", summary="List the job's artifacts", responses=error_responses(404))
def list_artifacts(session: SessionDep, tenant: TenantDep, job_id: str) -> list[ArtifactOut]:
    job = service.get_job(session, tenant, job_id)
    return [
        ArtifactOut(
            name=a.name,
            size_bytes=a.size_bytes,
            sha256=a.sha256,
            media_type=a.media_type,
            url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
        )
        for a in job.artifacts
    ]


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download one artifact (the quantized model is `quantized.onnx`)",
    description="Supports `Range` (206) and `If-None-Match` with the artifact's ETag, its sha256 (304). "
    "With QAAS_S3_PRESIGNED_DOWNLOADS=1 it answers 307 to a short-lived URL of the object store.",
    response_class=StreamingResponse,
    responses={**DOWNLOAD_RESPONSES, 307: {"description": "Download it from the presigned URL in `Location`."}},
)
def download_artifact(
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
    job_id: str,
    name: str,
) -> Response:
    artifact = service.get_artifact(session, tenant, job_id, name)
    return download(
        request,
        storage,
        artifact.storage_key,
        size=artifact.size_bytes,
        sha256=artifact.sha256,
        media_type=artifact.media_type,
        filename=artifact.name,
        headers=LOCKED_DOWN_HEADERS,
        presign_s=settings.s3_presign_expires_s if settings.s3_presigned_downloads else None,
    )
