"""Pure checks the API runs on uploads: ONNX models, datasets and zip archives (their fit to a
model is a shared rule: `core.datasets`)."""

from service.inspection.archive import ArchiveLimits, check_zip, extract_flat, safe_member_name
from service.inspection.dataset import (
    DatasetInfo,
    DatasetLimits,
    detect_format,
    inspect_dataset,
    parse_preprocess,
)
from service.inspection.model import ModelInfo, ModelLimits, inspect_model

__all__ = [
    "ArchiveLimits",
    "DatasetInfo",
    "DatasetLimits",
    "ModelInfo",
    "ModelLimits",
    "check_zip",
    "detect_format",
    "extract_flat",
    "inspect_dataset",
    "inspect_model",
    "parse_preprocess",
    "safe_member_name",
]
