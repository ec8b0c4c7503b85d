"""Celery configuration shared by the API (which only sends) and the worker (which consumes).

Celery with Redis delivers at least once; the settings below keep its failure modes away from
users, and the database (compare-and-set on every job transition) absorbs what they cannot:
- late acks and prefetch 1: a message is acknowledged only after its task returned, and a worker
  holds no message it is not running, so a killed worker loses at most the job it was running,
  which the lease and the sweep recover;
- a visibility timeout longer than the hard time limit: Redis never redelivers a message while
  its first delivery may still run;
- long-running tasks cancelled on connection loss: the runner hands the job back to the queue
  (SIGTERM in the pool process, see worker/tasks.py) instead of finishing a job whose message
  the broker will deliver again anyway;
- the broker retried forever, at start and after a loss: a worker outlives a Redis restart."""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.settings import Settings

RUN_JOB_TASK = "qaas.run_job"
MEASURE_TASK = "qaas.measure_job"
QUEUE = "qaas"  # every worker consumes it: jobs whose target is `any`


def class_queue(worker_class: str) -> str:
    """The queue the workers of one class consume besides QUEUE (names hold no dot: see core.placement)."""
    return f"{QUEUE}-class-{worker_class}"


def pool_queue(pool: str) -> str:
    """The queue the workers of one pool consume besides QUEUE and their class's."""
    return f"{QUEUE}-pool-{pool}"


def celery_config(settings: Settings) -> dict[str, Any]:
    soft_limit, hard_limit = task_time_limits(settings)
    transport: dict[str, Any]
    if settings.is_embedded:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # The default 1 s poll adds up to a second to every job; a directory listing is cheap.
            "polling_interval": 0.1,
        }
    else:
        # A redelivery must never start while the first delivery may still be running.
        transport = {"visibility_timeout": hard_limit + 600}
        if settings.broker_key_prefix:
            transport["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": soft_limit,
        "task_time_limit": hard_limit,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "broker_connection_timeout": 5,
    }


def task_time_limits(settings: Settings) -> tuple[int, int]:
    """Celery's soft and hard limits: a backstop behind the runner's own `job_timeout_s`, never in
    front of it, so a slow job ends with the runner's `timeout` error rather than a killed task."""
    soft = max(settings.task_soft_time_limit_s, int(settings.job_timeout_s) + 120)
    hard = max(settings.task_time_limit_s, soft + 60)
    return soft, hard


def make_celery(settings: Settings, main: str = "qaas") -> Celery:
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


class JobQueue:
    """The one client of the job queue, for the API and the worker alike: send a job id, and say
    whether the broker answers. The worker passes its own Celery app."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.app = app if app is not None else make_celery(settings, "qaas-api")

    def enqueue(self, job_id: str, countdown: float = 0.0, queue: str | None = None) -> None:
        """Send the job's message to `queue` (the job's target's; None: QUEUE, any worker), to be run
        `countdown` seconds from now (the worker that receives it holds it until then). Two quick retries
        cover a pooled connection that died with a Redis restart; a broker that stays down fails within
        about a second (the caller answers 503)."""
        self._send(RUN_JOB_TASK, [job_id], queue or QUEUE, countdown)

    def measure(self, job_id: str, target: str, queue: str) -> None:
        """Ask a worker of `queue` (a class's or a pool's) to measure a finished job's models there."""
        self._send(MEASURE_TASK, [job_id, target], queue, 0.0)

    def _send(self, task: str, args: list[str], queue: str, countdown: float) -> None:
        self.app.send_task(
            task,
            args=args,
            queue=queue,
            countdown=countdown or None,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
        )

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def close(self) -> None:
        self.app.close()
