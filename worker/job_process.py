"""The child process that does a job's heavy work: `python -m worker.job_process WORKDIR`.

Reads WORKDIR/job.json, runs the engine (`worker.engine.job.run_job`) under resource limits, prints
progress lines on stdout and writes WORKDIR/outcome.json (typed in core/jobfile.py and core/progress.py).
It never touches the database."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path

from core.errors import ErrorInfo, RuleError
from core.jobfile import ChildOutcome, JobFile
from core.lifecycle import AttemptStatus, Stage
from core.placement import Placement
from core.progress import Note, ProgressLine
from worker.engine.job import run_job
from worker.sandbox import apply_limits, die_with_parent, exit_on_sigterm, limit_error


class Reporter:
    """Progress lines on stdout: every progress call, and every note."""

    def __init__(self) -> None:
        self.stage = Stage.VALIDATING
        self.fraction = 0.0

    def __call__(self, stage: Stage, fraction: float) -> None:
        self.stage = stage
        self.fraction = round(float(fraction), 4)
        sys.stdout.write(ProgressLine(str(stage), self.fraction).line())
        sys.stdout.flush()

    def note(self, note: Note) -> None:
        """What the engine does now (mode auto: "candidate 2 of 5: ..." with the candidate, "search step 3")."""
        sys.stdout.write(ProgressLine(str(self.stage), self.fraction, note).line())
        sys.stdout.flush()


def run(job: JobFile, workdir: Path, report: Reporter) -> ChildOutcome:
    result, artifacts = run_job(job, workdir, report, report.note)
    return ChildOutcome(AttemptStatus.SUCCEEDED, result=result, artifacts=tuple(artifacts))


def main(workdir: Path) -> int:
    exit_on_sigterm()
    job = JobFile.read(workdir)
    if job.placement is None:  # the worker's class and pool, for the result's machine facts
        job = dataclasses.replace(job, placement=Placement.from_environ(os.environ))
    die_with_parent()
    apply_limits(job.limits)
    report = Reporter()
    try:
        outcome = run(job, workdir, report)
    except RuleError as exc:
        # ONNX Runtime's allocation failures under RLIMIT_AS arrive wrapped in a RuleError.
        error = limit_error(exc, job.limits, str(report.stage)) or exc.info
        outcome = ChildOutcome(AttemptStatus.FAILED, error=error)
    except Exception as exc:  # MemoryError included
        traceback.print_exc()  # to the worker's log, never to the user
        code = "evaluation_failed" if report.stage == Stage.EVALUATING else "quantization_failed"
        error = limit_error(exc, job.limits, str(report.stage)) or ErrorInfo(
            code, f"{type(exc).__name__} during {report.stage}: {str(exc)[:1000]}", {"stage": str(report.stage)}
        )
        outcome = ChildOutcome(AttemptStatus.FAILED, error=error)
    outcome.write(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
