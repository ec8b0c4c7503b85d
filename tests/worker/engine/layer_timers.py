"""Deterministic layer timings for the pre-flight (`worker.engine.preflight.KernelTimer`): the search's speed
decisions are tested with these, never with wall time (machines differ: AMD EPYC VNNI, Intel AMX)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from worker.engine.preflight import Layer


class TableTimer:
    """Every layer runs 1 ms in float; an int8 kind runs it `speedups[kind]` times faster, `by_op[op type][kind]`
    for one op type (`island` there: the float node between int8 neighbours, which otherwise costs as float).
    Records the layers it timed."""

    def __init__(self, speedups: Mapping[str, float], by_op: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.speedups = dict(speedups)
        self.by_op = {op: dict(kinds) for op, kinds in (by_op or {}).items()}
        self.timed: list[Layer] = []

    def time(self, layer: Layer, variants: Mapping[str, Path]) -> dict[str, float]:
        self.timed.append(layer)
        speeds = {**self.speedups, **self.by_op.get(layer.op_type, {})}
        return {name: 1.0 / speeds.get(name, 1.0) for name in variants}


def fast_int8() -> TableTimer:
    """Int8 twice as fast as float, but S8S8 half as fast (as on the Xeons the issue measured)."""
    return TableTimer({"qdq": 2.0, "qoperator": 2.0, "s8s8": 0.5, "dynamic": 2.0})


# A HardSwish-heavy mobile net on such a CPU: convs 1.5x in int8, but every HardSwish (after pre-processing a
# HardSigmoid and a Mul) costs three times float between int8 neighbours, and its Mul runs slower in int8.
BLOCKED = {"island": 1 / 3, "qdq": 0.5, "qoperator": 0.5, "s8s8": 0.3}


def hardswish_blocks() -> TableTimer:
    return TableTimer(
        {"qdq": 1.5, "qoperator": 1.5, "s8s8": 0.5, "dynamic": 0.2},
        by_op={"HardSwish": BLOCKED, "HardSigmoid": BLOCKED, "Mul": BLOCKED},
    )
