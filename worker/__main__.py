"""Entry point of a worker process: `python -m worker` (what compose and the tests run)."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from service import logs
from service.settings import get_settings
from worker.presence import this_worker


def main() -> None:
    settings = get_settings()
    from worker.celery_app import app

    if settings.log_format == "json":
        # Our handler on the root logger; Celery (which sets up its own when nobody handles this
        # signal) leaves logging alone, so its lines come out as JSON too.
        logs.configure(settings.log_level, settings.log_format)
        setup_logging.connect(_keep_our_logging, weak=False)

    app.worker_main(
        [
            *(["--quiet"] if settings.log_format == "json" else []),  # no banner: every line is JSON
            "worker",
            f"--loglevel={settings.log_level.upper()}",
            f"--concurrency={settings.worker_concurrency}",
            # Prefork on purpose: each job's runner lives in a pool process that Celery can signal
            # (SIGTERM hands the job back, see worker/tasks.py) and that dies with the worker.
            "--pool=prefork",
            # Any worker's queue, its class's and its pool's (worker/presence.py): a job that targets a
            # class or pool reaches only the workers of it.
            "--queues",
            ",".join(this_worker().queues),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def _keep_our_logging(**_: Any) -> None:
    """Connected to Celery's `setup_logging`: logging is already configured."""


if __name__ == "__main__":
    main()
