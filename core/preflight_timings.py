"""Mode auto's pre-flight layer timings as they cross between the worker and a job: the worker's cache for one
CPU and ONNX Runtime version, handed to the job read-only, and the timings the job measured, handed back.

The worker owns the cache (a job runs under a uid of its own and can write only its own folder). A job's file
is data from a process that ran a user's model: it is read with a size cap, without following links, and kept
only when every field is what a timing can be, for this very CPU and ONNX Runtime version."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from core.cpu import ARM_FLAGS, INT8_FLAGS, cpu, is_arm

MEASURED_FILE = "preflight_measured.json"  # what a job measured, in its own folder
HANDED_FILE = "preflight_timings.json"  # the worker's timings, among the job's read-only inputs
MAX_CACHE_ENTRIES = 20_000
MAX_MEASURED_ENTRIES = 2_048  # a job times at most MAX_LAYERS (128) layers per thread count
MAX_MEASURED_BYTES = 1 << 20
MAX_MS = 1e6  # a layer timed slower than this is no timing
KINDS = ("qdq", "qoperator", "s8s8", "dynamic")

# "<threads>:<layer key>": the layer key is a 32-hex digest (preflight.Layer.key).
EntryKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,4}:[0-9a-f]{32}$")]
Ms = Annotated[float, Field(gt=0, le=MAX_MS, allow_inf_nan=False)]


class Timing(BaseModel):
    """One layer on this CPU, ms per run (the session's own overhead taken off)."""

    model_config = ConfigDict(extra="ignore")

    float_ms: Ms
    island_ms: Ms
    int8_ms: dict[str, Ms] = {}  # the kinds whose quantizer quantized the node

    @field_validator("int8_ms")
    @classmethod
    def _known_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown int8 kinds {sorted(unknown)[:4]}")
        return value


class Identity(BaseModel):
    """Whose timings: the CPU's model name and int8 features, and ONNX Runtime's version."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    cpu_model: str | None = None
    cpu_features: list[str] = []
    onnxruntime: str = ""


class TimingsFile(Identity):
    entries: dict[EntryKey, Timing] = {}

    @property
    def identity(self) -> Identity:
        return Identity(cpu_model=self.cpu_model, cpu_features=self.cpu_features, onnxruntime=self.onnxruntime)


def int8_features() -> list[str]:
    """This CPU's int8 features as the engine records them (`machine.machine_info`), sorted."""
    flags = cpu().flags
    return sorted(f for f in INT8_FLAGS if f in flags and (f in ARM_FLAGS) == is_arm())


def this_machine(onnxruntime: str) -> Identity:
    return Identity(cpu_model=cpu().model, cpu_features=int8_features(), onnxruntime=onnxruntime)


class Refused(Exception):
    """A timings file that is not kept, and why (for the log)."""


def read_timings(path: Path, *, max_bytes: int, max_entries: int) -> TimingsFile:
    """The file as timings, or Refused: missing, not a regular file (links are not followed), larger than
    `max_bytes`, or not timings (a field of the wrong type or out of range, more than `max_entries`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise Refused(f"cannot be opened ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused("is not a regular file")
        if info.st_size > max_bytes:
            raise Refused(f"holds {info.st_size} bytes, more than {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fp:
            data = fp.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise Refused(f"holds more than {max_bytes} bytes")
    try:
        timings = TimingsFile.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        raise Refused(f"is not timings ({str(exc).splitlines()[0][:200]})") from exc
    if len(timings.entries) > max_entries:
        raise Refused(f"holds {len(timings.entries)} timings, more than {max_entries}")
    return timings


def write_timings(path: Path, timings: TimingsFile) -> None:
    """Written under a temporary name and renamed: a reader never sees half a file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.part"
    try:
        tmp.write_text(timings.model_dump_json())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
