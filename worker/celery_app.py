"""The worker's Celery app. Engines and sessions are made when a worker process starts."""

from __future__ import annotations

from celery import Celery

from service.queue import make_celery
from service.settings import get_settings


def create_celery() -> Celery:
    app = make_celery(get_settings(), "qaas-worker")
    app.conf.include = ["worker.tasks"]
    app.steps["consumer"].add("worker.tasks:ResendOnReconnect")
    return app


app = create_celery()
