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

COPY alembic.ini ./
COPY migrations ./migrations
COPY core ./core
COPY service ./service
COPY worker ./worker

USER qaas
EXPOSE 8000
CMD ["python", "-m", "service.api"]
