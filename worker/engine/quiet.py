"""Keep ONNX Runtime's tooling quiet: its quantization code prints to stdout, logs warnings on the
root logger ("Please consider to run pre-processing ...") and raises Python warnings."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_ort(collected: list[str] | None = None) -> Iterator[None]:
    """Silence stdout prints and root-logger chatter below ERROR for the duration; collect the
    Python warnings raised inside as one-line strings into `collected` (deduplicated)."""
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield
    finally:
        root.setLevel(old_level)
    if collected is not None:
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                continue
            msg = str(w.message).splitlines()[0][:300]
            if msg not in collected:
                collected.append(msg)
