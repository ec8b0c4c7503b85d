"""Limits a job process puts on itself before it touches untrusted input."""

from __future__ import annotations

import ctypes
import resource
import signal
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the worker that started it dies, so a killed worker
    leaves no orphan job running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lease and the sweep still recover the job
        pass


def apply_limits(limits: dict[str, Any]) -> None:
    memory = int(limits.get("memory_bytes", 0))
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = int(limits.get("cpu_s", 0))
    if cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 30))
