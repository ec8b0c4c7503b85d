"""Entry point of the API process: `python -m service.api` (what compose and the tests run)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    )


if __name__ == "__main__":
    main()
