"""GET /v1/targets: the worker classes and pools a job may name as its `target`."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import TenantDep
from service.deps import SessionDep, SettingsDep
from service.schemas import error_responses
from service.targets import service
from service.targets.schemas import Targets

router = APIRouter(prefix="/v1/targets", tags=["targets"])


@router.get(
    "",
    summary="Worker classes and pools a job can target",
    description="Each worker advertises its class (its architecture and best int8 instructions, e.g. "
    "`x86_64-avx512vnni`, `x86_64-amx`, `aarch64-i8mm`), its pool if its operator set one, and its cores and "
    "running tasks, every `QAAS_WORKER_HEARTBEAT_S` seconds. This lists the classes and pools heard from in the "
    "last hour with their workers and load; those with `live_workers` above 0 can be named in a job's `target` "
    "(a job whose target has no live worker is refused with 422 `invalid_target`). Workers are shared by every "
    "tenant: each sees the same list.",
    responses=error_responses(),
)
def list_targets(session: SessionDep, settings: SettingsDep, _tenant: TenantDep) -> Targets:
    return service.list_targets(session, settings)
