"""Limits a job process puts on itself before it touches untrusted input.

The job process (`python -m worker.job_process`) calls `die_with_parent()` and `apply_limits()`
first thing. The limits come from the job file the worker writes (`JobFile.limits`, see
`job_limits()`), so the worker decides and the child only obeys:

- `memory_bytes` -> RLIMIT_AS: an allocation beyond it fails (MemoryError in Python,
  bad_alloc / "Failed to allocate memory" in ONNX Runtime) instead of waking the OOM killer.
- `cpu_s` -> RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one.
- `file_bytes` -> RLIMIT_FSIZE: a write beyond it fails with EFBIG (Python ignores SIGXFSZ),
  so a model that makes the engine write a huge file cannot fill the disk.
- `open_files` -> RLIMIT_NOFILE.
- RLIMIT_CORE is always 0: a crash of a process with gigabytes mapped must not leave a core
  file of that size behind.

What crosses the boundary is minimal both ways: the job process starts with `child_env()` (none of
the worker's secrets, its temporary files inside the work dir), and the worker takes back only the
files `accept_artifacts()` lets through. `exit_on_sigterm()` makes a stop an orderly exit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from core.errors import ErrorInfo
from core.jobfile import ArtifactItem, Limits
from core.placement import PLACEMENT_VARIABLE

PR_SET_PDEATHSIG = 1
CPU_GRACE_S = 30  # between SIGXCPU (soft) and SIGKILL (hard)

# Native allocators report a failed allocation in these words (glibc, libstdc++, ONNX Runtime, numpy).
OUT_OF_MEMORY_MARKERS = (
    "bad_alloc",
    "Failed to allocate memory",
    "Cannot allocate memory",
    "Unable to allocate",
    "MemoryError",
    "out of memory",
)


def job_limits(memory_bytes: int, timeout_s: int, file_bytes: int, open_files: int) -> Limits:
    """The `limits` of a job file. CPU time gets four times the wall-clock limit: the engine uses
    several threads, and the wall-clock limit (enforced by the worker) is the one that bites."""
    return Limits(
        memory_bytes=int(memory_bytes),
        cpu_s=int(timeout_s) * 4,
        file_bytes=int(file_bytes),
        open_files=int(open_files),
    )


# The job process's whole environment, besides TMPDIR and PYTHONPATH: no QAAS_ setting (the database
# and broker URLs carry passwords; the job's limits travel in its job file), no cloud credentials; only the
# worker's class and pool, which its results record (PLACEMENT_VARIABLE, nothing secret).
CHILD_ENV_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", PLACEMENT_VARIABLE})
# What a job may hand back, and the media type each is served with: the runner decides, not the job.
ARTIFACT_MEDIA_TYPES = {
    "quantized.onnx": "application/octet-stream",
    "quantized.onnx.data": "application/octet-stream",
    "report.json": "application/json",
    "sensitivity.json": "application/json",
}
_ROOT = Path(__file__).resolve().parent.parent  # the tree `worker` is imported from, installed or not


def child_env(workdir: Path, parent: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of the job process in `workdir`: PATH and locale from `parent`; TMPDIR in the
    work dir, so model-sized temporaries (quant_pre_process writes some) go when it goes; and HOME
    in the work dir too, so that nothing kept in the worker's home (credentials, caches) is within
    the job's reach and whatever a library caches there goes with the job."""
    env = {k: v for k, v in parent.items() if k in CHILD_ENV_NAMES or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = env["TMP"] = env["TEMP"] = str(tmp)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), parent.get("PYTHONPATH", "")) if p)
    return env


class ArtifactRefused(Exception):
    """The job process handed back a file the worker does not take."""


def accept_artifacts(items: Sequence[ArtifactItem], workdir: Path) -> tuple[ArtifactItem, ...]:
    """The job's artifacts as the worker stores them: each a regular file inside `workdir` (not a
    link, not reached through one), named from ARTIFACT_MEDIA_TYPES, with the media type set here.
    Raises ArtifactRefused for anything else: a job that names other files is not trusted at all."""
    root = os.path.realpath(workdir)
    accepted: list[ArtifactItem] = []
    for item in items:
        name = str(item.name)
        if name not in ARTIFACT_MEDIA_TYPES or any(a.name == name for a in accepted):
            raise ArtifactRefused(f"artifact name {name[:100]!r} is not allowed, or repeated")
        path = os.path.abspath(os.path.join(workdir, str(item.path)))
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ArtifactRefused(f"artifact {name!r} is outside the work dir")
        info = os.lstat(real)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise ArtifactRefused(f"artifact {name!r} is not a regular file of its own")
        accepted.append(ArtifactItem(name, Path(real), ARTIFACT_MEDIA_TYPES[name]))
    return tuple(accepted)


def exit_on_sigterm() -> None:
    """SIGTERM (a cancel, a timeout, a worker handing the job back) becomes SystemExit, so `finally`
    blocks and context managers (ONNX Runtime's temporary folders among them) clean up on the way out."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the worker that started it dies, so a killed worker
    leaves no orphan job running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lease and the sweep still recover the job
        pass


def _lower(which: int, value: int, hard: int | None = None) -> None:
    """Set the soft limit to `value` and the hard one to `hard` (default `value`), never above the
    hard limit the process already has (an unprivileged process cannot raise it)."""
    _soft, current_hard = resource.getrlimit(which)

    def cap(v: int) -> int:
        return v if current_hard == resource.RLIM_INFINITY else min(v, current_hard)

    new_hard = cap(value if hard is None else hard)
    resource.setrlimit(which, (min(cap(value), new_hard), new_hard))


def apply_limits(limits: Limits) -> None:
    """Apply the job file's `limits`; a zero entry leaves that limit as inherited."""
    _lower(resource.RLIMIT_CORE, 0)
    if limits.memory_bytes:
        _lower(resource.RLIMIT_AS, limits.memory_bytes)
    if limits.cpu_s:
        _lower(resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + CPU_GRACE_S)
    if limits.file_bytes:
        _lower(resource.RLIMIT_FSIZE, limits.file_bytes)
    if limits.open_files:
        _lower(resource.RLIMIT_NOFILE, limits.open_files)


def is_out_of_memory(text: str) -> bool:
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


def _allocation_reason(text: str) -> str:
    """The words around the allocator's complaint, short enough to quote in a sentence."""
    for marker in OUT_OF_MEMORY_MARKERS:
        at = text.find(marker)
        if at >= 0:
            return " ".join(text[at : at + 160].split()).rstrip(".\"' ")
    return ""


def _errno_in_chain(exc: BaseException) -> int | None:
    """The errno of the first OSError among `exc` and its causes (the engine wraps what it catches)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def limit_error(exc: BaseException, limits: Limits, stage: str) -> ErrorInfo | None:
    """The `resource_limit` error for an exception caused by one of the limits, else None."""
    if isinstance(exc, MemoryError) or is_out_of_memory(str(exc)):
        reason = _allocation_reason(str(exc)) or type(exc).__name__
        return ErrorInfo(
            code="resource_limit",
            message=f"The job ran out of memory during {stage} ({reason}; the limit is "
            f"{limits.memory_bytes} bytes); use a smaller model, fewer calibration samples or a "
            "smaller calibration batch, or ask the operator to raise QAAS_JOB_MEMORY_BYTES.",
            detail={
                "stage": stage,
                "limit": "memory",
                "limit_bytes": limits.memory_bytes,
                "reason": reason,
            },
        )
    if _errno_in_chain(exc) == errno.EFBIG or os.strerror(errno.EFBIG) in str(exc):
        return ErrorInfo(
            code="resource_limit",
            message=f"The job tried to write a file larger than its limit of {limits.file_bytes} "
            f"bytes during {stage}; upload a smaller model or ask the operator to raise QAAS_JOB_FILE_BYTES.",
            detail={"stage": stage, "limit": "file_size", "limit_bytes": limits.file_bytes},
        )
    if _errno_in_chain(exc) == errno.EMFILE or os.strerror(errno.EMFILE) in str(exc):
        return ErrorInfo(
            code="resource_limit",
            message=f"The job opened more than its limit of {limits.open_files} files during "
            f"{stage}; ask the operator to raise QAAS_JOB_OPEN_FILES.",
            detail={"stage": stage, "limit": "open_files", "limit_files": limits.open_files},
        )
    return None


_SIGNAL_MEANING = {
    "SIGSEGV": "a segmentation fault",
    "SIGBUS": "a bus error",
    "SIGABRT": "an abort",
    "SIGILL": "an illegal instruction",
    "SIGFPE": "an arithmetic fault",
}


def exit_error(returncode: int, stderr_tail: str, limits: Limits) -> ErrorInfo:
    """The job's error when its process ended without writing an outcome.

    A limit the process hit (memory, CPU time, file size) is `resource_limit`; a crash (SIGSEGV and
    friends) or an exit without a result is `internal`, saying which signal. The stderr text only
    helps telling an out-of-memory abort from a crash; it is never quoted to the user.
    """
    try:
        sig = signal.Signals(-returncode).name if returncode < 0 else None
    except ValueError:
        sig = f"signal {-returncode}"
    detail: dict[str, Any] = {"exit_code": returncode} if sig is None else {"signal": sig}
    memory = limits.memory_bytes
    if is_out_of_memory(stderr_tail):
        return ErrorInfo(
            code="resource_limit",
            message=f"The job process ran out of memory: it needed more than its limit of {memory} bytes; "
            "use a smaller model, fewer calibration samples or a smaller calibration batch, or ask the "
            "operator to raise QAAS_JOB_MEMORY_BYTES.",
            detail={**detail, "limit": "memory", "limit_bytes": memory},
        )
    if sig == "SIGKILL":  # the kernel's OOM killer, or RLIMIT_CPU's hard limit
        return ErrorInfo(
            code="resource_limit",
            message="The job process was killed by SIGKILL, most likely for exceeding its memory limit "
            f"of {memory} bytes or its CPU-time limit of {limits.cpu_s} s; use a smaller model or "
            "fewer calibration samples, or ask the operator to raise QAAS_JOB_MEMORY_BYTES.",
            detail={
                **detail,
                "limit": "memory_or_cpu_time",
                "limit_bytes": memory,
                "limit_s": limits.cpu_s,
            },
        )
    if sig == "SIGXCPU":
        return ErrorInfo(
            code="resource_limit",
            message=f"The job process used more than its CPU-time limit of {limits.cpu_s} s and "
            "was stopped; use fewer calibration samples or latency runs, or ask the operator to raise "
            "QAAS_JOB_TIMEOUT_S.",
            detail={**detail, "limit": "cpu_time", "limit_s": limits.cpu_s},
        )
    if sig == "SIGXFSZ":
        return ErrorInfo(
            code="resource_limit",
            message="The job process tried to write a file larger than its limit of "
            f"{limits.file_bytes} bytes and was stopped; upload a smaller model or ask the operator "
            "to raise QAAS_JOB_FILE_BYTES.",
            detail={**detail, "limit": "file_size", "limit_bytes": limits.file_bytes},
        )
    if sig is not None:
        meaning = _SIGNAL_MEANING.get(sig, "a fatal signal")
        return ErrorInfo(
            code="internal",
            message=f"The job process crashed with {sig} ({meaning}); the model probably triggers a bug "
            "in ONNX Runtime. The service is unaffected; try another recipe, or report the model to the "
            "operator.",
            detail=detail,
        )
    return ErrorInfo(
        code="internal",
        message=f"The job process exited with code {returncode} without a result; the worker's log has the details.",
        detail=detail,
    )
