"""QaaS client: the `qaas` command and `Client`, over HTTP only (no server dependencies)."""

from qaas_client.client import Client, Job
from qaas_client.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    QaasError,
    RateLimitedError,
    ServerError,
    TooLargeError,
    UnavailableError,
)
from qaas_client.types import Accuracy, Artifact, Dataset, JobUpdate, Model, OutputFidelity, Report

__all__ = [
    "Accuracy",
    "Artifact",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "Dataset",
    "InvalidInputError",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "JobUpdate",
    "Model",
    "NotFoundError",
    "OutputFidelity",
    "QaasError",
    "RateLimitedError",
    "Report",
    "ServerError",
    "TooLargeError",
    "UnavailableError",
]
