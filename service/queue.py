"""Celery configuration shared by the API (which only sends) and the worker (which consumes)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.settings import Settings

RUN_JOB_TASK = "qaas.run_job"
QUEUE = "qaas"


def celery_config(settings: Settings) -> dict[str, Any]:
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
        }
    else:
        # A redelivery must never start while the first delivery may still be running.
        transport = {"visibility_timeout": settings.task_time_limit_s + 600}
        if settings.broker_key_prefix:
            transport["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "broker_connection_timeout": 5,
    }


def make_celery(settings: Settings, main: str = "qaas") -> Celery:
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


class JobQueue:
    """What the API needs of the broker: send a job id, and say whether the broker answers."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings, "qaas-api")

    def enqueue(self, job_id: str) -> None:
        self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE, retry=False)

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def close(self) -> None:
        self.app.close()
