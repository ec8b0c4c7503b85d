"""Entry point of the API process: `python -m service.api` (what compose and the tests run)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service import logs
from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    logs.configure(settings.log_level, settings.log_format)
    problem = settings.insecure_listen_problem
    if problem:
        logging.getLogger("service").error("refusing to start: %s", problem)
        sys.exit(2)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        log_config=None,  # uvicorn's loggers propagate to the root handler set up above
    )


if __name__ == "__main__":
    main()
