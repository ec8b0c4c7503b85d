"""Wire shapes of the Model resource."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from core.model import TensorSpec
from service.schemas import OrmModel


class ExternalDataFile(OrmModel):
    name: str
    size_bytes: int
    sha256: str


class ModelOut(OrmModel):
    id: str
    name: str = Field(examples=["resnet18"])
    sha256: str = Field(description="SHA-256 of the .onnx file.")
    size_bytes: int = Field(description="Bytes on disk: the .onnx file plus its external data files.")
    ir_version: int = Field(examples=[8])
    opset: int = Field(examples=[13])
    producer: str = Field(examples=["pytorch 2.5.0"])
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    op_counts: dict[str, int] = Field(examples=[{"Conv": 20, "Relu": 17, "Gemm": 1}])
    quantization: str | None = Field(
        None,
        description="`qdq` or `qoperator` when the uploaded model is already quantized "
        "(for example exported from quantization-aware training), else null.",
    )
    external_data: list[ExternalDataFile] = Field(default_factory=list)
    created_at: datetime
