"""Entry point of a worker process: `python -m worker` (what compose and the tests run)."""

from __future__ import annotations

from service.queue import QUEUE
from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    from worker.celery_app import app

    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level.upper()}",
            f"--concurrency={settings.worker_concurrency}",
            # Prefork on purpose: each job's runner lives in a pool process that Celery can signal
            # (SIGTERM hands the job back, see worker/tasks.py) and that dies with the worker.
            "--pool=prefork",
            "--queues",
            QUEUE,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
