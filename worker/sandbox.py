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
files `accept_artifacts()` lets through, copied from the files it checked. `exit_on_sigterm()` makes a
stop an orderly exit.

Who the job process is: a worker running as root gives each job a uid of its own (`claim_job_user()`,
from QAAS_JOB_UID_RANGE), which owns only the job's folder and can read only its inputs; every process
of that uid is killed when the job ends. Elsewhere jobs run as the worker's own user, and
`job_user_problem()` says why, for the one warning that says what a job can reach then.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import grp
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from core.errors import ErrorInfo
from core.jobfile import ArtifactItem, Limits
from core.placement import PLACEMENT_VARIABLE

if TYPE_CHECKING:  # the job process imports this module too, and needs no settings
    from service.settings import Settings

log = logging.getLogger(__name__)

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


def accept_artifacts(
    items: Sequence[ArtifactItem], workdir: Path, owner: int | None = None
) -> tuple[ArtifactItem, ...]:
    """The job's artifacts as the worker stores them, named from ARTIFACT_MEDIA_TYPES with the media
    type set here. Each is opened without following a link anywhere below `workdir`, and checked on
    the open file: a regular file with one link (and with `owner`, the job's uid, owned by it). Its
    bytes are copied from that open file into a folder of the worker's: what is stored is what was
    checked, whatever becomes of the job's names for it later.
    Raises ArtifactRefused for anything else: a job that names other files is not trusted at all."""
    accepted: list[ArtifactItem] = []
    into: Path | None = None
    for item in items:
        name = str(item.name)
        if name not in ARTIFACT_MEDIA_TYPES or any(a.name == name for a in accepted):
            raise ArtifactRefused(f"artifact name {name[:100]!r} is not allowed, or repeated")
        with _open_below(workdir, Path(item.path), name) as fd:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise ArtifactRefused(f"artifact {name!r} is not a regular file of its own")
            if owner is not None and info.st_uid != owner:
                raise ArtifactRefused(f"artifact {name!r} is not the job's own file")
            into = into or Path(tempfile.mkdtemp(prefix=".accepted-", dir=workdir))
            _copy(fd, into / name)
        accepted.append(ArtifactItem(name, into / name, ARTIFACT_MEDIA_TYPES[name]))
    return tuple(accepted)


@contextlib.contextmanager
def _open_below(workdir: Path, path: Path, name: str) -> Iterator[int]:
    """`path` (inside `workdir`) opened for reading one folder at a time, refusing a link at every step,
    and without blocking (a FIFO would hang a plain open)."""
    relative = os.path.relpath(os.path.normpath(workdir / path), workdir)
    parts = relative.split(os.sep)
    if relative == os.curdir or parts[0] == os.pardir:
        raise ArtifactRefused(f"artifact {name!r} is outside the work dir")
    folder = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            os.close(folder)
            folder = below
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, dir_fd=folder)
    except OSError as exc:  # ELOOP: a link; ENOTDIR: a link on the way
        raise ArtifactRefused(f"artifact {name!r} is not a file reached without links ({exc.strerror})") from None
    finally:
        os.close(folder)
    try:
        yield fd
    finally:
        os.close(fd)


def _copy(src: int, dest: Path) -> None:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            while os.copy_file_range(src, out, 1 << 30):  # in the kernel; a reflink where the disk can
                pass
        except OSError:  # no copy_file_range here (old kernel, odd file system): plain reads
            os.lseek(src, 0, os.SEEK_SET)
            os.ftruncate(out, 0)
            os.lseek(out, 0, os.SEEK_SET)
            with open(src, "rb", closefd=False) as reader, open(out, "wb", closefd=False) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
    finally:
        os.close(out)


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


# -- the job's own user ------------------------------------------------------------------------------

# Folders every user may write: a job's files left there would be readable by the next job of its uid.
SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# RLIMIT_NPROC of a job's uid (its threads count): room for ONNX Runtime's pools, none for a fork bomb,
# so that killing every process of the uid is done in a few rounds.
JOB_PROCESSES = max(1024, 16 * (os.cpu_count() or 1))
PR_SET_NO_NEW_PRIVS = 38
_CLAIM = "\0qaas-job-uid-{}"  # an abstract socket: one per uid on this host, gone with its holder
_warned: set[str] = set()


class JobUser:
    """A uid of one job's own for one attempt, its gid the same number, no other groups.

    Held through a socket bound to an abstract name, so no other job on this host gets the uid
    meanwhile, and a SIGKILLed worker's claims go with it. Claiming it kills whatever a SIGKILLed
    worker's job left running under it; `release()` kills every process of the uid, however it left
    its process group, and takes the work dir back."""

    def __init__(self, uid: int, claim: socket.socket) -> None:
        self.uid = self.gid = uid
        self._claim = claim
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not after

    def give(self, workdir: Path) -> None:
        """The job's folder (and its TMPDIR and HOME, `child_env`) becomes the job's own, 0700; what the
        worker put there (job.json, the inputs) stays the worker's, readable and not writable."""
        for folder in (workdir / "tmp", workdir / "home", workdir):
            os.lchown(folder, self.uid, self.gid)
        workdir.chmod(0o700)

    def become(self) -> None:
        """In the job's process, between fork and exec (Popen's preexec_fn): drop to the job's uid for good,
        and gain nothing back through a set-user-ID program."""
        resource.setrlimit(resource.RLIMIT_NPROC, (JOB_PROCESSES, JOB_PROCESSES))
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)  # as root: real, effective and saved uid
        if self._prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")

    def end(self) -> None:
        """Every process of the uid killed, and its files in the shared temporary folders removed."""
        kill_every_process_of(self.uid)
        _remove_files_of(self.uid)

    def release(self, workdir: Path) -> None:
        """The job is over: none of its processes is left, and `workdir` is the worker's again (0700), so
        the next job of this uid cannot reach it."""
        try:
            self.end()
            with contextlib.suppress(FileNotFoundError):
                os.lchown(workdir, os.geteuid(), os.getegid())
        finally:
            self._claim.close()


def job_user_problem(settings: Settings) -> str | None:
    """Why a job of this worker cannot run under a uid of its own, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the worker does not run on Linux"
    if settings.job_uids is None:
        return "QAAS_JOB_UID_RANGE is off"
    if os.geteuid() != 0:
        return f"the worker runs as uid {os.geteuid()}, not root, and cannot switch users"
    if blocked := _python_out_of_reach():
        return f"a job's uid could not run this Python: {blocked} may not be entered or read by other users"
    work = settings.resolved_work_dir
    for folder in work.parents:
        if folder != settings.resolved_data_dir and not folder.is_relative_to(settings.resolved_data_dir):
            with contextlib.suppress(OSError):
                if not folder.stat().st_mode & stat.S_IXOTH:
                    return f"{folder} (above the work dir {work}) may not be entered by other users"
    return None


@functools.cache
def _python_out_of_reach() -> Path | None:
    """The first folder or file on the way to the interpreter, its standard library, its packages or
    this source tree that other users may not enter (folders) or run (the interpreter), else None."""
    paths = sysconfig.get_paths()
    wanted = {Path(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    for target in (Path(os.path.realpath(sys.executable)), Path(sys.prefix), _ROOT, *wanted):
        for step in (*reversed(target.parents), target):
            try:
                mode = step.stat().st_mode
            except OSError:
                continue
            need = stat.S_IROTH | stat.S_IXOTH if step == target and stat.S_ISDIR(mode) else stat.S_IXOTH
            if mode & need != need:
                return step
    return None


def claim_job_user(settings: Settings, workdir: Path) -> JobUser | None:
    """A uid of its own for the job in `workdir` (the lowest free one of QAAS_JOB_UID_RANGE), with the
    folders around the work dir made fit for it; None when the job must run as the worker's user, after
    a warning (once per process and reason) that says what the job can reach then."""
    problem = job_user_problem(settings)
    if problem is not None:
        if problem not in _warned:
            _warned.add(problem)
            log.warning(
                "jobs run as this worker's own user (uid %d) because %s: a job's process can read and write "
                "whatever the worker can (its data dir %s with the stored files, the input cache and other "
                "jobs' folders, and the environment of the worker's processes with the database, broker and "
                "storage credentials) and can leave its process group to outlive its job. Run the worker as "
                "root with QAAS_JOB_UID_RANGE (README: Isolation) to give each job a uid of its own.",
                os.geteuid(),
                problem,
                settings.resolved_data_dir,
            )
        return None
    assert settings.job_uids is not None
    _make_way(settings, workdir)
    for uid in settings.job_uids:
        if _known_id(uid):
            continue
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(_CLAIM.format(uid))
        except OSError:  # another job on this host has it
            claim.close()
            continue
        user = JobUser(uid, claim)
        user.end()  # what a job of a SIGKILLed worker left behind under this uid
        return user
    raise RuntimeError(f"every uid of QAAS_JOB_UID_RANGE ({settings.job_uid_range}) is in use or taken")


def _known_id(uid: int) -> bool:
    """A uid or gid some user or group of this host has: never a job's."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _make_way(settings: Settings, workdir: Path) -> None:
    """A job's uid may pass through the data dir to its own folder (0711: enter, not list) and reach
    nothing else there: every other entry of the folders on the way loses its group and other bits (the
    database, the stored files, the input cache, the broker's messages), and so does local storage."""
    data, work = settings.resolved_data_dir, settings.resolved_work_dir
    way = [p for p in (*reversed(work.parents), work) if p == data or p.is_relative_to(data)]
    for folder, toward in zip(way, [*way[1:], None], strict=True):
        folder.chmod(0o711)
        if toward is None:
            continue
        for entry in os.scandir(folder):
            if entry.path != str(toward) and not entry.is_symlink():
                with contextlib.suppress(OSError):
                    os.chmod(entry.path, stat.S_IMODE(entry.stat().st_mode) & 0o700)
    if work not in way:  # the work dir is elsewhere: the data dir is the worker's alone
        work.chmod(0o711)
        with contextlib.suppress(FileNotFoundError):
            data.chmod(0o700)
    workdir.parent.chmod(0o711)  # the job's folder, which holds its attempts' folders
    with contextlib.suppress(FileNotFoundError):
        settings.resolved_storage_dir.chmod(0o700)


def kill_every_process_of(uid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL to every process of `uid` (another session or process group too), until none is left;
    zombies are dead already. The uid's RLIMIT_NPROC keeps the rounds few."""
    if uid in (0, os.getuid(), os.geteuid()):
        raise ValueError(f"uid {uid} is not a job's")
    deadline = time.monotonic() + timeout_s
    while pids := _processes_of(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.error("processes %s of job uid %d are still alive after %.0f s", pids, uid, timeout_s)
            return
        time.sleep(0.005)


def _processes_of(uid: int) -> list[int]:
    """Live processes whose real, effective, saved or file-system uid is `uid` (read from /proc/PID/status:
    /proc/PID's owner is root for a process that made itself not dumpable)."""
    wanted = str(uid).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                status = f.read()
        except OSError:  # gone meanwhile
            continue
        state = uids = None
        for line in status.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1:2]
            elif line.startswith(b"Uid:"):
                uids = line.split()[1:]
                break
        if uids is not None and wanted in uids and state not in ([b"Z"], [b"X"]):
            found.append(int(entry.name))
    return found


def _remove_files_of(uid: int) -> None:
    for folder in SHARED_TEMP_DIRS:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
                if info.st_uid != uid:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(entry.path)  # never follows a link (fd-based on Linux)
                else:
                    os.unlink(entry.path)
            except OSError as exc:
                log.warning("could not remove %s, left by job uid %d: %s", entry.path, uid, exc)
