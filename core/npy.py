"""The `.npy` header reader: shape and dtype of an array without loading it (one home for the API and the engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from numpy.lib import format as npformat

from core.errors import RuleError

MAX_NPY_HEADER = 1 << 16
NUMERIC_KINDS = "biufc"  # bool, ints, floats, complex: what an array may hold to feed a tensor

# --------------------------------------------------------------------------------------------
# .npy headers


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    data_offset: int  # from where the header started

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(fp: IO[bytes], what: str) -> NpyHeader:
    """Read and check a `.npy` header at the stream's position (numeric dtypes only, no pickles).
    Raises RuleError `invalid_dataset` naming `what`."""
    start = fp.tell()
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        offset = fp.tell() - start
    except Exception as exc:  # numpy's parser raises many types (TokenError, RecursionError, ...)
        raise RuleError(
            "invalid_dataset",
            f"{what} is not a valid .npy array ({str(exc).strip()[:200]}); save it with numpy.save or numpy.savez.",
            {"array": what},
        ) from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in NUMERIC_KINDS:
        raise RuleError(
            "invalid_dataset",
            f"{what} has dtype {dtype}, which needs pickling or is not numeric; save plain numeric arrays.",
            {"array": what, "dtype": str(dtype)},
        )
    if any(d < 0 for d in shape):
        raise RuleError(
            "invalid_dataset",
            f"{what} declares the negative shape {list(shape)}; save it again.",
            {"array": what, "shape": list(shape)},
        )
    return NpyHeader(tuple(int(d) for d in shape), dtype, bool(fortran), int(offset))
