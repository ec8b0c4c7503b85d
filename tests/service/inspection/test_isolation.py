"""Inspections in a child process: what it raises comes back the same, and its memory, time and crashes
are its own."""

from __future__ import annotations

import os
import time

import pytest

from service.errors import InvalidModel, ResourceLimit
from service.inspection import isolation
from service.inspection.isolation import run_isolated


def refuse(detail: dict[str, int]) -> None:
    raise InvalidModel("No.", detail=detail)


def allocate(nbytes: int) -> int:
    return len(bytearray(nbytes))


def crash() -> None:
    os.abort()


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def pid() -> int:
    return os.getpid()


def test_what_the_child_raises_is_raised_here() -> None:
    with pytest.raises(InvalidModel, match="No") as err:
        run_isolated(refuse, {"a": 1}, memory_bytes=64 << 20, timeout_s=30, what="it")
    assert err.value.detail == {"a": 1} and err.value.status == 422


def test_the_child_has_its_own_memory_cap() -> None:
    assert run_isolated(allocate, 8 << 20, memory_bytes=64 << 20, timeout_s=30, what="it") == 8 << 20
    with pytest.raises(ResourceLimit, match="needs more than the 64 MiB"):
        run_isolated(allocate, 256 << 20, memory_bytes=64 << 20, timeout_s=30, what="it")


def test_a_crash_or_an_overrun_ends_the_child_only() -> None:
    with pytest.raises(InvalidModel, match="ended without an answer"):
        run_isolated(crash, memory_bytes=64 << 20, timeout_s=30, what="it")
    started = time.monotonic()
    with pytest.raises(ResourceLimit, match=r"took longer than 0\.5 s"):
        run_isolated(sleep, 30.0, memory_bytes=64 << 20, timeout_s=0.5, what="it")
    assert time.monotonic() - started < 10
    assert run_isolated(pid, memory_bytes=64 << 20, timeout_s=30, what="it") != os.getpid()


def test_a_helper_that_died_is_started_again() -> None:
    isolation.start()
    helper = isolation._helper.process
    assert helper is not None
    helper.kill()
    helper.wait()
    assert run_isolated(allocate, 1, memory_bytes=64 << 20, timeout_s=30, what="it") == 1
