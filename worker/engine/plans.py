"""Dataset plans, made once per job process: each (dataset file, inputs, batch size) is planned the first time
it is read, and validation, calibration, every candidate's scoring and the evaluation read that same plan."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from core.jobfile import DatasetSource
from core.model import TensorSpec

T = TypeVar("T")
PlanKey = tuple[Any, ...]
PLANS: dict[PlanKey, Any] = {}


def plan_key(source: DatasetSource, inputs: Sequence[TensorSpec], batch_size: int) -> PlanKey:
    """What a plan depends on: the file as it is on disk, how it is read, and what it feeds."""
    info = Path(source.path).stat()
    preprocess = json.dumps(source.preprocess, sort_keys=True) if source.preprocess is not None else None
    return (str(source.path), info.st_size, info.st_mtime_ns, source.format, preprocess, tuple(inputs), batch_size)


def planned(key: PlanKey, make: Callable[[], T]) -> T:
    """The plan under `key`, made by `make` the first time (errors are not remembered: they raise again)."""
    if key not in PLANS:
        PLANS[key] = make()
    return cast(T, PLANS[key])
