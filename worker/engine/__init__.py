"""The quantization and evaluation engine: paths and typed specs in, typed results out.

No Celery, SQLAlchemy or FastAPI in here; it is runnable and testable on its own.
"""

from worker.engine.checks import ModelFacts, check_recipe, check_recipe_for_model, model_facts
from worker.engine.data import (
    Batch,
    count_batches,
    iter_batches,
    model_inputs,
    model_outputs,
    synthesize_batch,
)
from worker.engine.errors import EngineError
from worker.engine.evaluate import evaluate, size_on_disk
from worker.engine.latency import LatencyStats, time_interleaved
from worker.engine.machine import machine_info
from worker.engine.metrics import POOR_COSINE, POOR_SQNR_DB, SQNR_CAP_DB
from worker.engine.quantize import quantize
from worker.engine.results import EvaluationOutcome, QuantizationOutcome
from worker.engine.spec import (
    CalibrationMethod,
    DatasetSource,
    EvaluationSpec,
    Mode,
    ProgressCallback,
    QType,
    QuantFormat,
    QuantizationSpec,
    Stage,
    TensorSpec,
    no_progress,
)

__all__ = [
    "POOR_COSINE",
    "POOR_SQNR_DB",
    "SQNR_CAP_DB",
    "Batch",
    "CalibrationMethod",
    "DatasetSource",
    "EngineError",
    "EvaluationOutcome",
    "EvaluationSpec",
    "LatencyStats",
    "Mode",
    "ModelFacts",
    "ProgressCallback",
    "QType",
    "QuantFormat",
    "QuantizationOutcome",
    "QuantizationSpec",
    "Stage",
    "TensorSpec",
    "check_recipe",
    "check_recipe_for_model",
    "count_batches",
    "evaluate",
    "iter_batches",
    "machine_info",
    "model_facts",
    "model_inputs",
    "model_outputs",
    "no_progress",
    "quantize",
    "size_on_disk",
    "synthesize_batch",
    "time_interleaved",
]
