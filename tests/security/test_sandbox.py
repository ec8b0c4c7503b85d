"""The job process's limits (worker/sandbox.py): what it sets on itself, and how a job that hit a
limit or crashed is reported."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.errors import RuleError
from worker.sandbox import exit_error, job_limits, limit_error

LIMITS = job_limits(memory_bytes=1 << 30, timeout_s=60, file_bytes=2 << 20, open_files=128)


def run_limited(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import json, resource, sys
        from core.jobfile import Limits
        from worker.sandbox import apply_limits
        apply_limits({LIMITS!r})
        {textwrap.indent(textwrap.dedent(code), "        ").strip()}
    """)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=60,
    )


def test_limits_are_applied(tmp_path: Path) -> None:
    done = run_limited(
        """
        names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"]
        print(json.dumps({n: resource.getrlimit(getattr(resource, n)) for n in names}))
    """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["RLIMIT_AS"] == [1 << 30, 1 << 30]
    assert got["RLIMIT_CPU"] == [240, 270]
    assert got["RLIMIT_FSIZE"] == [2 << 20, 2 << 20]
    assert got["RLIMIT_NOFILE"] == [128, 128]
    assert got["RLIMIT_CORE"] == [0, 0]


def test_a_big_write_fails_instead_of_filling_the_disk(tmp_path: Path) -> None:
    done = run_limited(
        """
        try:
            with open("big.bin", "wb") as f:
                f.write(bytes(3 << 20))
        except OSError as exc:
            print(exc.errno)
    """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == errno.EFBIG
    assert (tmp_path / "big.bin").stat().st_size <= 2 << 20


def test_a_big_allocation_fails_instead_of_waking_the_oom_killer(tmp_path: Path) -> None:
    done = run_limited(
        """
        try:
            bytearray(2 << 30)
        except MemoryError:
            print("MemoryError")
    """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MemoryError"


@pytest.mark.parametrize(
    ("exc", "limit"),
    [
        (MemoryError(), "memory"),
        (
            RuleError(
                "evaluation_failed",
                "ONNX Runtime could not run the original model: Failed to allocate "
                "memory for requested buffer of size 2147483648",
            ),
            "memory",
        ),
        (
            RuleError("quantization_failed", "Pre-processing the model failed: [Errno 27] File too large"),
            "file_size",
        ),
        (OSError(errno.EFBIG, "File too large"), "file_size"),
        (OSError(errno.EMFILE, "Too many open files"), "open_files"),
    ],
)
def test_exceptions_from_a_limit_become_resource_limit(exc: BaseException, limit: str) -> None:
    error = limit_error(exc, LIMITS, "calibrating")
    assert error is not None
    assert error.code == "resource_limit"
    assert error.detail["limit"] == limit
    assert "during calibrating" in error.message


def test_other_exceptions_are_left_alone() -> None:
    assert limit_error(ValueError("bad shape"), LIMITS, "quantizing") is None


@pytest.mark.parametrize(
    ("returncode", "stderr", "code", "says"),
    [
        (-signal.SIGSEGV, "", "internal", "crashed with SIGSEGV (a segmentation fault)"),
        (-signal.SIGBUS, "", "internal", "crashed with SIGBUS"),
        (-signal.SIGABRT, "Fatal Python error: Aborted", "internal", "crashed with SIGABRT"),
        (
            -signal.SIGABRT,
            "terminate called after throwing an instance of 'std::bad_alloc'",
            "resource_limit",
            "needed more than its limit of 1073741824 bytes",
        ),
        (-signal.SIGKILL, "", "resource_limit", f"memory limit of {1 << 30} bytes"),
        (-signal.SIGXCPU, "", "resource_limit", "CPU-time limit of 240 s"),
        (-signal.SIGXFSZ, "", "resource_limit", f"limit of {2 << 20} bytes"),
        (3, "Traceback (most recent call last): ...", "internal", "exited with code 3 without a result"),
    ],
)
def test_how_a_job_process_ended_is_reported(returncode: int, stderr: str, code: str, says: str) -> None:
    error = exit_error(returncode, stderr, LIMITS)
    assert error.code == code
    assert says in error.message
    if stderr:
        assert stderr not in json.dumps(error.to_dict()), "stderr is for the worker's log, not the user"
