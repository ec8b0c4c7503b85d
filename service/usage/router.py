"""GET /v1/usage: what the caller's tenant stores and runs, beside its quotas."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import TenantDep
from service.deps import SessionDep, SettingsDep
from service.schemas import error_responses
from service.usage import service
from service.usage.schemas import Usage

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", summary="Your storage, job counts and quotas", responses=error_responses())
def get_usage(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Usage:
    return service.usage(session, settings, tenant)
