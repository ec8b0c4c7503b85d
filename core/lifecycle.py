"""The job's vocabulary: its statuses, the stages it goes through, and how an attempt of it ends."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)


class Stage(StrEnum):
    """Stages of a job, in order. The engine reports progress within one of them."""

    QUEUED = "queued"
    VALIDATING = "validating"
    PREPROCESSING = "preprocessing"
    CALIBRATING = "calibrating"
    QUANTIZING = "quantizing"
    EVALUATING = "evaluating"
    REPORTING = "reporting"
    DONE = "done"


# Where each working stage sits on the job's overall progress bar.
STAGE_SPAN: dict[str, tuple[float, float]] = {
    Stage.VALIDATING: (0.0, 0.03),
    Stage.PREPROCESSING: (0.03, 0.10),
    Stage.CALIBRATING: (0.10, 0.50),
    Stage.QUANTIZING: (0.50, 0.60),
    Stage.EVALUATING: (0.60, 0.95),
    Stage.REPORTING: (0.95, 1.0),
}


def overall_progress(stage: str, fraction: float) -> float:
    """The job's progress (0..1) when `fraction` of `stage` is done."""
    start, end = STAGE_SPAN.get(stage, (0.0, 1.0))
    return start + (end - start) * max(0.0, min(1.0, fraction))


class AttemptStatus(StrEnum):
    """How one attempt ended: the job process says succeeded or failed; the worker decides the others."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"  # the job was taken from this attempt (its lease ran out)
    HANDED_BACK = "handed_back"  # stopped on request; the job goes back to the queue
