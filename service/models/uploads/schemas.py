"""Wire shapes of /v1/uploads: the files an upload declares, and the part URLs it hands out."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

SHA256 = r"^[0-9a-f]{64}$"
GIB = 1 << 30
EXAMPLE_ID = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
EXAMPLE_URL = (
    "https://s3.example.com/qaas/models/3f0e6a52-5a0c-4a9e-9b0e-1f2d3c4b5a69/model.onnx.data?uploadId=..."
    "&partNumber=1&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-SignedHeaders=content-length%3Bhost&X-Amz-Signature=..."
)


class UploadFileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=1024,
        description="The file's name, exactly as the model's external-data `location` refers to it.",
        examples=["model.onnx.data"],
    )
    size_bytes: int = Field(ge=0, description="Its size; the parts handed out add up to it.")
    sha256: str | None = Field(
        None,
        pattern=SHA256,
        description="Its SHA-256 (lower-case hex), when known before the upload; else give it when completing "
        "the model (`external_data_sha256`), or the service reads the stored file once to hash it.",
    )


class UploadCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"files": [{"name": "model.onnx.data", "size_bytes": 3 * GIB}]}]},
    )

    files: list[UploadFileIn] = Field(
        min_length=1,
        description="The model's external-data files (not a .zip of them; at most 999, the model being the "
        "1,000th file of the upload).",
    )


class PartOut(BaseModel):
    number: int = Field(description="The part's number, from 1.")
    size_bytes: int = Field(description="Exactly this many bytes of the file go in this part (its Content-Length).")
    offset: int = Field(description="Where in the file the part starts.")
    url: str = Field(description="`PUT` the part's bytes here: to the object store, without the API key.")


class UploadFileOut(BaseModel):
    name: str
    size_bytes: int
    sha256: str | None
    parts: list[PartOut] = Field(description="Empty once the upload is completed.")


class UploadOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": EXAMPLE_ID,
                    "status": "open",
                    "model_id": None,
                    "files": [
                        {
                            "name": "model.onnx.data",
                            "size_bytes": 100 << 20,
                            "sha256": None,
                            "parts": [
                                {"number": 1, "size_bytes": 64 << 20, "offset": 0, "url": EXAMPLE_URL},
                                {"number": 2, "size_bytes": 36 << 20, "offset": 64 << 20, "url": "..."},
                            ],
                        }
                    ],
                    "created_at": "2026-12-05T13:00:00Z",
                    "expires_at": "2026-12-06T13:00:00Z",
                }
            ]
        }
    )

    id: str
    status: str = Field(description="`open`, then `completed` (the model exists: `model_id`).")
    model_id: str | None = Field(description="The model it was completed into; null while open.")
    files: list[UploadFileOut]
    created_at: datetime
    expires_at: datetime = Field(
        description="Complete the model before this; then the part URLs expire and the parts are removed."
    )
