"""Wire shapes of the Dataset resource."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from service.schemas import OrmModel


class TensorShape(OrmModel):
    dtype: str = Field(examples=["float32"])
    shape: list[int] = Field(examples=[[32, 3, 224, 224]])


class DatasetOut(OrmModel):
    id: str
    name: str = Field(examples=["calibration-32"])
    format: Literal["npz", "npy", "images"]
    num_samples: int = Field(
        description="Length of axis 0 shared by the arrays: samples for stacked arrays "
        "(rank = input rank + 1), rows for batched ones (rank = input rank)."
    )
    size_bytes: int
    sha256: str
    tensors: dict[str, TensorShape] = Field(
        description="Arrays by input name as stored, axis 0 included. For `.npy` the key is `*` "
        "(the model's only input)."
    )
    has_labels: bool
    preprocess: dict[str, Any] | None = None
    created_at: datetime
