"""The child process that measures a finished job's models on this worker's class:
`python -m worker.measure_process WORKDIR`.

Reads WORKDIR/job.json (the job's inputs) and WORKDIR/measure.json (its stored artifact), measures under the
job's resource limits and writes WORKDIR/measured.json (a `core.result.MeasuredOn`, `failed` with the
error when the measurement could not be made). It never touches the database. ONNX Runtime is imported
only after the process has tied its life to the worker's."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path

from core.errors import ErrorInfo, RuleError
from core.jobfile import JobFile, MeasureFile, write_measured
from core.placement import Placement
from core.result import MeasuredOn
from worker.sandbox import apply_limits, die_with_parent, exit_on_sigterm, limit_error


def main(workdir: Path) -> int:
    exit_on_sigterm()
    die_with_parent()
    job = JobFile.read(workdir)
    if job.placement is None:  # the worker's class and pool, which the measurement records
        job = dataclasses.replace(job, placement=Placement.from_environ(os.environ))
    measure = MeasureFile.read(workdir)
    apply_limits(job.limits)
    try:
        from worker.engine.measured_on import measure_on

        measured = measure_on(job, measure, workdir / "engine")
    except RuleError as exc:
        measured = MeasuredOn.failed(measure.target, limit_error(exc, job.limits, "evaluating") or exc.info)
    except Exception as exc:  # MemoryError included
        traceback.print_exc()  # to the worker's log, never to the user
        error = limit_error(exc, job.limits, "evaluating") or ErrorInfo(
            "evaluation_failed", f"{type(exc).__name__} while measuring: {str(exc)[:1000]}", {"stage": "evaluating"}
        )
        measured = MeasuredOn.failed(measure.target, error)
    write_measured(workdir, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
