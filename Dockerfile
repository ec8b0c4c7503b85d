# One image for the API, the workers and the migration job; compose picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    QAAS_DATA_DIR=/data

WORKDIR /app

# Dependency layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

RUN useradd --create-home --uid 10001 qaas \
    && mkdir -p /data/storage /data/work \
    && chown -R qaas:qaas /data

# The source stays root's and readable by every user: a job's process runs it under a uid of its own.
COPY alembic.ini ./
COPY migrations ./migrations
COPY core ./core
COPY service ./service
COPY worker ./worker

# The API and the migration run as qaas; compose starts the workers as root (with a few capabilities)
# only so that each job runs under a uid of its own (README: Isolation).
USER qaas
EXPOSE 8000
CMD ["python", "-m", "service.api"]
