"""`make run`: the embedded default in one command. Starts the API and one worker as child
processes (the same entry points compose runs), restarts the worker if it dies, and stops both
on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType

from service.settings import get_settings

API = [sys.executable, "-m", "service.api"]
WORKER = [sys.executable, "-m", "worker"]
MIGRATE = [sys.executable, "-m", "service.migrate"]
GRACE_S = 15.0


class Supervisor:
    def __init__(self) -> None:
        self.stopping = False
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        settings = get_settings()
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        subprocess.run(MIGRATE, check=True)
        self.api = subprocess.Popen(API)
        self.worker = subprocess.Popen(WORKER)
        mode = "embedded (SQLite, filesystem broker)" if settings.is_embedded else "external database and broker"
        print(
            f"\nQaaS is starting on http://{settings.host}:{settings.port} "
            f"({mode}, data in {settings.resolved_data_dir})\n"
            f"  Swagger UI: http://{settings.host}:{settings.port}/docs\n  Press Ctrl-C to stop.\n",
            flush=True,
        )
        restarts: list[float] = []
        code = 0
        while not self.stopping:
            time.sleep(0.5)
            if self.api.poll() is not None:
                print(f"The API exited with code {self.api.returncode}; stopping.", file=sys.stderr, flush=True)
                code = self.api.returncode or 1
                break
            if self.worker.poll() is not None and not self.stopping:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                delay = min(30.0, 2.0 ** (len(restarts) - 1))
                print(
                    f"The worker exited with code {self.worker.returncode}; restarting it in {delay:.0f} s.",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
                if not self.stopping:
                    self.worker = subprocess.Popen(WORKER)
        self.shutdown()
        return code

    def shutdown(self) -> None:
        children = [p for p in (self.worker, self.api) if p is not None and p.poll() is None]
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        print("QaaS stopped.", flush=True)


def main() -> None:
    sys.exit(Supervisor().run())


if __name__ == "__main__":
    main()
