"""Inspections run in a short-lived child process under a memory cap, so that what an upload costs to
inspect is never held by the API process itself.

The children are forked by a small helper process (started once, from the API's lifespan, with the
inspection code imported): a fork costs milliseconds, where a fresh interpreter would spend a second
importing ONNX. The API process is never forked itself: it runs threads (the server's pool), and a fork
copies whatever locks they hold. Each inspection gets a socket of its own, handed to the helper over
its control socket; the helper forks, and the child answers on that socket and exits. The helper exits
when the API process does (its control socket closes)."""

from __future__ import annotations

import atexit
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from service.errors import InvalidModel, ResourceLimit, ServiceError, Unavailable

T = TypeVar("T")

_PRELOAD = "service.inspection.model"  # what every child runs: imported once, in the helper
_FORK_TIMEOUT_S = 60  # a fork answers in milliseconds; the first one waits for the helper's imports


class _Helper:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None

    def start(self) -> None:
        with self.lock:
            self._ensure()

    def fork(self) -> Connection:
        """A connection to a new child of the helper (which is started again if it is gone)."""
        mine, theirs = socket.socketpair()
        try:
            with self.lock:
                try:
                    socket.send_fds(self._ensure(), [b"f"], [theirs.fileno()])
                except OSError:  # the helper went between the check and the send
                    self._stop()
                    socket.send_fds(self._ensure(), [b"f"], [theirs.fileno()])
        finally:
            theirs.close()
        return Connection(mine.detach())

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self) -> None:
        """At exit: the helper ends once its control socket closes."""
        with self.lock:
            if self.control is not None:
                self.control.close()
                self.control = None
            if self.process is not None:
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self._stop()
                self.process = None

    def _ensure(self) -> socket.socket:
        if self.process is not None and self.process.poll() is None and self.control is not None:
            return self.control
        if self.control is not None:
            self.control.close()
        control, theirs = socket.socketpair()
        code = f"import sys; sys.path[:0] = {sys.path!r}; from {__name__} import _serve; _serve({theirs.fileno()})"
        # One thread: numpy's BLAS would start a pool at import, and a fork copies only the forking thread.
        env = {**os.environ, **dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")}
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.control = control
        return control


_helper = _Helper()
atexit.register(_helper.close)


def start() -> None:
    """Start the helper now (the API's lifespan does), not on the first upload."""
    _helper.start()


def run_isolated(fn: Callable[..., T], *args: Any, memory_bytes: int, timeout_s: float, what: str) -> T:
    """`fn(*args)` (a module-level function) in a child process whose address space may grow by at most
    `memory_bytes` over what it has when it starts. A ServiceError raised there is raised here, the
    same; the cap or the time running out is ResourceLimit; a child that dies without an answer (a crash
    in native code) is InvalidModel. `what` names the input in messages ("the model")."""
    with _helper.fork() as conn:
        conn.send((fn, args, memory_bytes))
        if not conn.poll(_FORK_TIMEOUT_S):
            raise Unavailable(f"The process that inspects uploads did not answer; upload {what} again later.")
        try:
            pid = conn.recv()  # the child's first word
            if not conn.poll(timeout_s):
                os.kill(pid, signal.SIGKILL)
                raise ResourceLimit(
                    f"Inspecting {what} took longer than {timeout_s:g} s; upload a smaller model.",
                    detail={"limit_s": timeout_s},
                )
            kind, value = conn.recv()
        except EOFError:
            raise InvalidModel(
                f"Inspecting {what} failed (the inspecting process ended without an answer); check that the "
                "file is a valid ONNX model and upload it again.",
            ) from None
    if kind == "ok":
        return value
    if kind == "memory":
        raise ResourceLimit(
            f"Inspecting {what} needs more than the {memory_bytes >> 20} MiB it may use; upload a smaller model.",
            detail={"limit_bytes": memory_bytes},
        )
    if kind == "error" and isinstance(value, ServiceError):
        raise value
    raise RuntimeError(f"inspecting {what} failed: {value}")


# --------------------------------------------------------------------------------------------
# The helper's side


def _serve(fd: int) -> None:
    """The helper's loop: a fork for every socket the API hands over, until the API goes."""
    __import__(_PRELOAD)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the API's terminal is the API's to handle
    control = socket.socket(fileno=fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message:
            return  # the API process is gone
        for child_fd in fds:
            if os.fork() == 0:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _child(Connection(child_fd))
                os._exit(0)
            os.close(child_fd)


def _child(conn: Connection) -> None:
    conn.send(os.getpid())
    fn, args, memory_bytes = conn.recv()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of a process with a model in memory
    used = _address_space()
    if used:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = used + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        outcome: tuple[str, Any] = ("ok", fn(*args))
    except ServiceError as exc:
        outcome = ("error", exc)
    except MemoryError:
        outcome = ("memory", None)
    except Exception as exc:  # a bug, not the input's fault: the API answers 500
        outcome = ("bug", f"{type(exc).__name__}: {exc}")
    conn.send(outcome)
    conn.close()


def _address_space() -> int:
    """This process's address space now (VmSize), in bytes; 0 where /proc cannot tell (no cap then)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            line = next(x for x in status if x.startswith("VmSize:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024
