"""The quantization and evaluation engine: paths and typed specs in, typed results out.

No Celery, SQLAlchemy or FastAPI in here; it is runnable and testable on its own.
"""

from worker.engine.errors import EngineError
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
    "CalibrationMethod",
    "DatasetSource",
    "EngineError",
    "EvaluationOutcome",
    "EvaluationSpec",
    "Mode",
    "ProgressCallback",
    "QType",
    "QuantFormat",
    "QuantizationOutcome",
    "QuantizationSpec",
    "Stage",
    "TensorSpec",
    "no_progress",
]
