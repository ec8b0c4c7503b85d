"""Wire shape of GET /v1/usage."""

from __future__ import annotations

from pydantic import BaseModel, Field


class StorageUsage(BaseModel):
    total_bytes: int = Field(description="Models + datasets + job artifacts.")
    models_bytes: int
    datasets_bytes: int
    artifacts_bytes: int
    files: int = Field(description="Stored files (external-data files and artifacts included).")
    quota_used_bytes: int = Field(
        description="What the storage quota counts: `total_bytes` plus a fixed overhead per file (4096 bytes)."
    )
    quota_bytes: int = Field(
        description="`QAAS_QUOTA_STORAGE_BYTES`: uploads beyond it are refused (413 `quota_exceeded`)."
    )


class JobCounts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    active_quota: int = Field(description="`QAAS_QUOTA_ACTIVE_JOBS`: queued + running jobs allowed at once (then 429).")


class Usage(BaseModel):
    tenant: str = Field(examples=["acme"])
    storage: StorageUsage
    jobs: JobCounts
    models: int = Field(description="Stored models.")
    datasets: int = Field(description="Stored datasets.")
    rate_limit_per_minute: int = Field(description="Requests per API key per minute, per API process.")
