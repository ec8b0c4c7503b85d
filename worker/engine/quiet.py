"""Keep ONNX Runtime's tooling quiet: its quantization code prints to stdout, logs warnings on the
root logger ("Please consider to run pre-processing ...") and raises Python warnings. The warnings
are collected as one-line strings, and those a library repeats once per value (onnxconverter-common
warns once per float16-truncated tensor) are folded into one with a count and the extreme value."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence

# A number standing on its own (not the 32 of "float32" nor part of a name like "conv1").
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")
_FP16_TRUNCATED = "the float32 number # will be truncated to #"


@contextlib.contextmanager
def quiet_ort(collected: list[str] | None = None) -> Iterator[None]:
    """Silence stdout prints and root-logger chatter below ERROR for the duration; collect the
    Python warnings raised inside as one-line strings into `collected` (deduplicated, and
    repeats that differ only in their numbers folded: see fold_repeats)."""
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
        messages = [
            str(w.message).splitlines()[0][:300]
            for w in caught
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        ]
        for msg in fold_repeats(messages):
            if msg not in collected:
                collected.append(msg)


def fold_repeats(messages: Sequence[str]) -> list[str]:
    """The messages in first-seen order, each message that recurs with other numbers folded into
    one line saying how often it came (exact repeats included) and its extreme value. A message
    that only recurs as it is stays one line."""
    groups: dict[str, list[str]] = {}
    for msg in messages:
        groups.setdefault(_NUMBER.sub("#", msg), []).append(msg)
    folded: list[str] = []
    for template, group in groups.items():
        if len(set(group)) == 1:
            folded.append(group[0])
        elif template == _FP16_TRUNCATED:
            folded += _fold_fp16_truncation(group)
        else:
            folded.append(_fold(group))
    return folded


def _numbers(msg: str) -> list[float]:
    return [float(n) for n in _NUMBER.findall(msg)]


def _fold(group: list[str]) -> str:
    """`<first message> (and N more like it; largest magnitude X)`, X over the numbers that vary."""
    rows = [_numbers(m) for m in group]
    varying = [abs(row[i]) for i in range(len(rows[0])) if len({r[i] for r in rows}) > 1 for row in rows]
    extreme = f"; largest magnitude {max(varying):.3g}" if varying else ""
    return f"{group[0]} (and {len(group) - 1} more like it{extreme})"


def _fold_fp16_truncation(group: list[str]) -> list[str]:
    """onnxconverter-common clips each float32 tensor to ±max_finite_val and raises its values
    nearer zero than ±min_positive_val, warning once per tensor and sign with the extreme value."""
    clipped = [(abs(v), abs(to)) for v, to in map(_numbers, group) if abs(to) >= 1]
    raised = [(abs(v), abs(to)) for v, to in map(_numbers, group) if abs(to) < 1]
    out = []
    if clipped:
        limit = clipped[0][1]
        out.append(
            f"The float16 conversion clipped float32 values beyond ±{limit:g} to ±{limit:g} ({len(clipped)} "
            f"warnings, one per tensor and sign; largest magnitude {max(v for v, _ in clipped):.3g})."
        )
    if raised:
        limit = raised[0][1]
        out.append(
            f"The float16 conversion raised float32 values closer to zero than {limit:g} to ±{limit:g} "
            f"({len(raised)} warnings, one per tensor and sign; smallest magnitude {min(v for v, _ in raised):.3g})."
        )
    return out
