"""Wire shapes of GET /v1/targets: the worker classes and pools seen recently, their workers and load."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_WORKER_EXAMPLE: dict[str, Any] = {
    "id": "6c1d2b8e-41a9-4b53-9a0e-2f4c5d6e7f80",
    "hostname": "vnni-host-1",
    "pid": 4121,
    "pool": "edge",
    "cores": 16,
    "concurrency": 2,
    "running": 1,
    "live": True,
    "started_at": "2026-12-04T08:00:00Z",
    "last_seen_at": "2026-12-04T09:30:12Z",
}


class TargetWorker(BaseModel):
    """One worker process of a class, as its last heartbeat described it."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [_WORKER_EXAMPLE]})

    id: str = Field(description="New at every start of the worker process.")
    hostname: str
    pid: int
    pool: str | None = Field(None, description="Its pool (QAAS_WORKER_POOL), if its operator set one.")
    cores: int = Field(description="CPU cores the worker may use.")
    concurrency: int = Field(description="Tasks it runs at once (QAAS_WORKER_CONCURRENCY).")
    running: int = Field(description="Tasks (jobs and measurements) it ran at its last heartbeat.")
    live: bool = Field(description="Heard from within `live_within_s` and not shut down.")
    started_at: datetime
    last_seen_at: datetime


class TargetClass(BaseModel):
    """A worker class: workers with the same architecture and best int8 instructions (or the same
    QAAS_WORKER_CLASS). A job may name it as its `target` while `live_workers` is above 0."""

    name: str = Field(examples=["x86_64-avx512vnni"])
    architecture: str = Field(examples=["x86_64"])
    features: list[str] = Field(
        description="The int8-relevant instructions its workers advertise (AVX2, AVX-512, VNNI, AMX, ARM dot "
        "product and i8mm, as Linux names them).",
        examples=[["avx2", "avx512f", "avx512bw", "avx512_vnni"]],
    )
    pools: list[str] = Field(description="Pools its live workers are in.")
    live_workers: int
    running: int = Field(description="Tasks its live workers run now.")
    capacity: int = Field(description="Tasks its live workers can run at once.")
    last_seen_at: datetime
    workers: list[TargetWorker]


class TargetPool(BaseModel):
    """A pool (QAAS_WORKER_POOL): workers an operator grouped under one name. A job may name it as its
    `target` while `live_workers` is above 0."""

    name: str = Field(examples=["edge"])
    classes: list[str] = Field(description="The classes of its live workers.")
    live_workers: int
    running: int
    capacity: int


class Targets(BaseModel):
    """What a job's `target` can name: `any`, a class or a pool with a live worker, or a list of them."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "live_within_s": 90,
                    "seen_within_s": 3600,
                    "classes": [
                        {
                            "name": "x86_64-avx512vnni",
                            "architecture": "x86_64",
                            "features": ["avx2", "avx512f", "avx512bw", "avx512_vnni"],
                            "pools": ["edge"],
                            "live_workers": 1,
                            "running": 1,
                            "capacity": 2,
                            "last_seen_at": "2026-12-04T09:30:12Z",
                            "workers": [_WORKER_EXAMPLE],
                        }
                    ],
                    "pools": [
                        {
                            "name": "edge",
                            "classes": ["x86_64-avx512vnni"],
                            "live_workers": 1,
                            "running": 1,
                            "capacity": 2,
                        }
                    ],
                }
            ]
        }
    )

    live_within_s: float = Field(description="QAAS_WORKER_LIVE_S: a worker heard from within this is live.")
    seen_within_s: float = Field(description="Classes and pools heard from within this are listed.")
    classes: list[TargetClass]
    pools: list[TargetPool]
