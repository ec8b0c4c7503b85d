"""A job's inputs: its rows read into the typed job file, the files it names fetched into the work dir.

They are fetched through this worker's cache (`worker/inputs.py`). All of it stays the worker's: the job
(under a uid of its own, `worker/sandbox.py`) may read its inputs and job file, and change none of them.

An input deleted (its row) or missing from storage (its object) raises InputMissing: no later attempt
can bring it back. A stored recipe that a rule made since refuses raises RuleError; storage that does
not answer raises StorageUnavailable, for the runner to put the job back in line."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorInfo
from core.evaluation import EvaluationSettings, EvaluationSpec
from core.jobfile import JOB_FILE, DatasetSource, JobFile
from core.model import TensorSpec
from core.recipe import Mode, parse_recipe
from service.database import transaction
from service.settings import Settings
from service.storage import ObjectMissing
from service.tables import Dataset, Job, OnnxModel
from worker.inputs import InputCache
from worker.preflight_timings import TimingsKeeper
from worker.sandbox import job_limits


class InputMissing(Exception):
    """An input of the job (its model, reference model or dataset) is gone: deleted, or missing from
    storage. No later attempt can bring it back, so the job fails with `input_missing`."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.error = ErrorInfo(
            "input_missing",
            f"The job's {what} is no longer stored (it was deleted), so the job cannot run; upload it "
            "again and start a new job.",
            {"input": what},
        )


def write_job_file(
    session_factory: sessionmaker[Session],
    settings: Settings,
    cache: InputCache,
    job_id: str,
    workdir: Path,
    timings: TimingsKeeper | None = None,
) -> None:
    """The job's inputs are fetched into `workdir/inputs` (through this worker's cache) once the
    rows are read, and job.json points the job's process at them. Mode auto also gets a read-only copy of
    the pre-flight timings `timings` keeps."""
    inputs = workdir / "inputs"
    # what it is (for messages), key, sha256, size, local copy, a file of its own
    fetches: list[tuple[str, str, str, int, Path, bool]] = []
    with transaction(session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        model = session.get(OnnxModel, job.model_id)
        if model is None or model.deleted_at is not None:
            raise InputMissing("model")

        def source(dataset_id: str | None) -> DatasetSource | None:
            if dataset_id is None:
                return None
            row = session.get(Dataset, dataset_id)
            if row is None or row.deleted_at is not None:
                raise InputMissing(f"dataset {dataset_id}")
            local = inputs / dataset_id / row.storage_key.rsplit("/", 1)[-1]
            fetches.append((f"dataset {dataset_id}", row.storage_key, row.sha256, row.size_bytes, local, False))
            return DatasetSource(local, row.format, row.preprocess)

        def model_files(row: OnnxModel, folder: Path, what: str) -> Path:
            """The model's file, its external data files beside it as they were uploaded."""
            external = [(e["name"], e["sha256"], e["size_bytes"]) for e in row.external_data or []]
            size = row.size_bytes - sum(s for _, _, s in external)
            for name, sha256, file_size in [(row.file_name, row.sha256, size), *external]:
                key = f"{row.storage_prefix}/{name}"
                fetches.append((f"{what} file {name!r}", key, sha256, file_size, folder / name, True))
            return folder / row.file_name

        asked = EvaluationSettings(**(job.evaluation or {}))
        reference_path = None
        reference_id = (job.recipe or {}).get("reference_model_id")
        if reference_id:  # mode compare
            reference = session.get(OnnxModel, reference_id)
            if reference is None or reference.deleted_at is not None:
                raise InputMissing("reference model")
            reference_path = model_files(reference, inputs / "reference", "reference model")
        spec = JobFile(
            job_id=job.id,
            model_path=model_files(model, inputs / "model", "model"),
            inputs=tuple(TensorSpec.from_mapping(i) for i in model.inputs),
            recipe=parse_recipe(job.recipe),
            reference_model_path=reference_path,
            evaluation=EvaluationSpec.capped(
                asked,
                max_latency_runs=settings.max_latency_runs,
                max_samples=settings.evaluation_max_samples,
                max_seconds=settings.evaluation_max_seconds,
            ),
            calibration=source(job.calibration_dataset_id),
            evaluation_data=source(job.evaluation_dataset_id),
            reused_calibration=job.evaluation_dataset_id is not None
            and job.evaluation_dataset_id == job.calibration_dataset_id,
            limits=job_limits(
                settings.job_memory_bytes,
                settings.job_timeout_s,
                settings.resolved_job_file_bytes,
                settings.job_open_files,
            ),
        )
    for what, key, sha256, size, local, copy in fetches:
        if local.exists():  # the same dataset for calibration and evaluation
            continue
        try:
            cache.fetch(key, sha256, size, local, copy=copy)
        except ObjectMissing as exc:
            raise InputMissing(what) from exc
    if timings is not None and spec.recipe.mode == Mode.AUTO:
        spec = dataclasses.replace(spec, preflight_timings=timings.hand_in(inputs))
    for folder, _, _ in os.walk(inputs):
        os.chmod(folder, 0o755)  # whatever the worker's umask: the job's uid enters and reads (the files are 0444)
    spec.write(workdir)
    (workdir / JOB_FILE).chmod(0o444)
