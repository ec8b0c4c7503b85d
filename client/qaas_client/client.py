"""The Python client: `Client(url, api_key=key).quantize("m.onnx", calibration="c.npz").wait(progress=True)`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path, PureWindowsPath
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from qaas_client import config, direct
from qaas_client.errors import (
    InsecureTransportWarning,
    JobCancelledError,
    JobFailedError,
    QaasError,
    UnsafeResponseError,
)
from qaas_client.events import follow
from qaas_client.http import Http, RetryHook, cleartext_key_warning
from qaas_client.progress import ProgressView
from qaas_client.types import Artifact, Dataset, JobUpdate, Model, Report

log = logging.getLogger("qaas_client")
PathLike = str | os.PathLike[str]
MODEL_FILE = "quantized.onnx"
# The quantized model's own files (the .onnx and its external data) are binary; reports are JSON.
MODEL_MEDIA_TYPE = "application/octet-stream"
DATA_SUFFIXES = (".onnx", ".npz", ".npy", ".zip", ".data", ".bin")
PAGE = 200
UPLOAD_READ_TIMEOUT_S = 900.0  # the service checks a large model or dataset before it answers


def _local_file(value: PathLike) -> Path | None:
    """The file to upload, or None when `value` is the id of something already uploaded."""
    path = Path(value)
    if path.is_file():
        return path
    text = os.fspath(value)
    if isinstance(value, os.PathLike) or os.sep in text or text.lower().endswith(DATA_SUFFIXES):
        raise FileNotFoundError(f"No such file: {text}")
    return None


def _saved_path(folder: Path, name: str) -> Path:
    """Where an artifact the service named lands: a plain file name, in `folder` and nowhere else.
    The name comes from the service, which is not trusted with the user's files: `../x` or
    `/home/u/.bashrc` is refused, and so is a symbolic link of that name found in the folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or any(c in name for c in ("/", "\\", "\0"))
        or os.path.isabs(name)
        or PureWindowsPath(name).drive
    ):
        raise UnsafeResponseError(
            "unsafe_artifact_name",
            f"The service named an artifact {name!r}, which is not a plain file name; nothing was saved.",
        )
    real_folder = folder.resolve()
    target = real_folder / name
    if target.is_symlink() or target.resolve().parent != real_folder:
        raise UnsafeResponseError(
            "unsafe_artifact_name",
            f"{target} is a symbolic link; the artifact {name!r} is not written through it. "
            "Remove the link or download into another folder; nothing was saved.",
        )
    return target


class Client:
    """A connection to a QaaS service. `url` and `api_key` default to QAAS_URL / QAAS_API_KEY, then to
    what `qaas login` saved, then to http://127.0.0.1:8000 without a key.

    Requests answered 429 or 503 are retried after the `Retry-After` the service gives (up to
    `max_retries` times, never waiting longer than `max_wait_s` at once). Failures raise a subclass
    of `QaasError` carrying the service's error code. A key about to go over plain `http://` to another
    machine raises an `InsecureTransportWarning`.

    A model's external data goes straight to the service's object store when it offers that
    (`direct_uploads`, on by default; see `upload_model`)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_wait_s: float = 120.0,
        on_retry: RetryHook | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
        direct_uploads: bool = True,
    ) -> None:
        connection = config.resolve(url, api_key)
        self.direct_uploads = direct_uploads
        self._store: httpx.Client | None = None
        self.url = connection.url
        insecure = cleartext_key_warning(connection.url, connection.api_key)
        if insecure is not None:
            warnings.warn(insecure, InsecureTransportWarning, stacklevel=2)
        extra: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        self.http = Http(
            connection.url,
            connection.api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_wait_s=max_wait_s,
            transport=transport,
            on_retry=on_retry,
            **extra,
        )

    def close(self) -> None:
        self.http.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _pages(self, path: str, limit: int | None, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list, following `next_cursor`; at most `limit` items."""
        cursor: str | None = None
        count = 0
        while True:
            page_size = PAGE if limit is None else max(1, min(PAGE, limit - count))
            page = self.http.json("GET", path, params={**params, "limit": page_size, "cursor": cursor})
            for item in page["items"]:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and count >= limit):
                return

    # Models

    def upload_model(self, path: PathLike, *, name: str | None = None, external_data: Sequence[PathLike] = ()) -> Model:
        """Uploads an `.onnx` file; `external_data`: the files its weights live in (or one .zip of them).

        When the service keeps its files in an object store, the external data files go there directly
        (presigned part URLs, several parts at once; the bytes never pass through the service) and the
        model is completed with the upload's id; a service that does not offer it, or a store this
        machine cannot reach, gets them with the model as one multipart request instead."""
        model_path = Path(path)
        extras = [Path(p) for p in external_data]
        if self.direct_uploads and extras and not any(p.suffix.lower() == ".zip" for p in extras):
            model = self._upload_model_direct(model_path, extras, name)
            if model is not None:
                return model

        def files(stack: ExitStack) -> list[tuple[str, Any]]:
            parts = [("file", (model_path.name, stack.enter_context(model_path.open("rb"))))]
            for extra in map(Path, external_data):
                parts.append(("external_data", (extra.name, stack.enter_context(extra.open("rb")))))
            return parts

        data = {"name": name} if name else None
        return Model.from_json(
            self.http.json("POST", "/v1/models", open_files=files, data=data, read_timeout=UPLOAD_READ_TIMEOUT_S)
        )

    def _upload_model_direct(self, model_path: Path, extras: list[Path], name: str | None) -> Model | None:
        """The model with its external data sent straight to the object store; None when the service
        does not offer it (remembered) or the store cannot be reached from here (the upload is abandoned)."""
        plan = direct.start(self.http, extras)
        if plan is None:
            self.direct_uploads = False
            return None
        if self._store is None:
            self._store = httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0))
        log.info("uploading %d external data files straight to the object store", len(extras))
        try:
            hashes = direct.send(plan, extras, self._store)
            data = {"upload_id": plan["id"], "external_data_sha256": json.dumps(hashes)}
            if name:
                data["name"] = name

            def files(stack: ExitStack) -> list[tuple[str, Any]]:
                return [("file", (model_path.name, stack.enter_context(model_path.open("rb"))))]

            answer = self.http.json(
                "POST", "/v1/models", open_files=files, data=data, read_timeout=UPLOAD_READ_TIMEOUT_S
            )
        except direct.StoreUnreachable as exc:
            log.warning("%s; sending the external data through the service instead", exc)
            self._abandon(plan["id"])
            return None
        except BaseException:
            self._abandon(plan["id"])
            raise
        return Model.from_json(answer)

    def _abandon(self, upload_id: str) -> None:
        """Best effort: the service also aborts an upload left open once it expires."""
        with contextlib.suppress(QaasError):
            self.http.send("DELETE", f"/v1/uploads/{quote(upload_id, safe='')}")

    def get_model(self, model_id: str) -> Model:
        return Model.from_json(self.http.json("GET", f"/v1/models/{model_id}"))

    def list_models(self, limit: int | None = None) -> Iterator[Model]:
        return (Model.from_json(m) for m in self._pages("/v1/models", limit, {}))

    def delete_model(self, model_id: str) -> None:
        self.http.send("DELETE", f"/v1/models/{model_id}")

    # Datasets

    def upload_dataset(
        self, path: PathLike, *, name: str | None = None, preprocess: dict[str, Any] | str | None = None
    ) -> Dataset:
        """Uploads `.npz`/`.npy` arrays, or a `.zip` of images with a `preprocess` spec (dict or JSON)."""
        data_path = Path(path)
        form: dict[str, str] = {}
        if name:
            form["name"] = name
        if preprocess is not None:
            form["preprocess"] = preprocess if isinstance(preprocess, str) else json.dumps(preprocess)

        def files(stack: ExitStack) -> dict[str, Any]:
            return {"file": (data_path.name, stack.enter_context(data_path.open("rb")))}

        return Dataset.from_json(
            self.http.json(
                "POST", "/v1/datasets", open_files=files, data=form or None, read_timeout=UPLOAD_READ_TIMEOUT_S
            )
        )

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(self.http.json("GET", f"/v1/datasets/{dataset_id}"))

    def list_datasets(self, limit: int | None = None) -> Iterator[Dataset]:
        return (Dataset.from_json(d) for d in self._pages("/v1/datasets", limit, {}))

    def delete_dataset(self, dataset_id: str) -> None:
        self.http.send("DELETE", f"/v1/datasets/{dataset_id}")

    # Jobs

    def create_job(
        self,
        model_id: str,
        *,
        calibration_dataset_id: str | None = None,
        evaluation_dataset_id: str | None = None,
        recipe: dict[str, Any] | None = None,
        evaluation_settings: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queues a job. The `Idempotency-Key` (a new one unless given) makes retries return the same job."""
        body: dict[str, Any] = {"model_id": model_id, "recipe": recipe or {}}
        if calibration_dataset_id:
            body["calibration_dataset_id"] = calibration_dataset_id
        if evaluation_dataset_id:
            body["evaluation_dataset_id"] = evaluation_dataset_id
        if evaluation_settings:
            body["evaluation"] = evaluation_settings
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return Job(self, self.http.json("POST", "/v1/jobs", json=body, headers=headers))

    def get_job(self, job_id: str) -> Job:
        return Job(self, self.http.json("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(
        self, *, status: str | None = None, model_id: str | None = None, limit: int | None = None
    ) -> Iterator[Job]:
        params = {k: v for k, v in {"status": status, "model_id": model_id}.items() if v}
        return (Job(self, j) for j in self._pages("/v1/jobs", limit, params))

    def usage(self) -> dict[str, Any]:
        """The tenant's stored bytes, job counts and quotas (`GET /v1/usage`)."""
        usage: dict[str, Any] = self.http.json("GET", "/v1/usage")
        return usage

    def quantize(
        self,
        model: PathLike | Model,
        calibration: PathLike | Dataset | None = None,
        evaluation: PathLike | Dataset | None = None,
        *,
        mode: str | None = None,
        recipe: dict[str, Any] | None = None,
        evaluation_settings: dict[str, Any] | None = None,
        preprocess: dict[str, Any] | str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Uploads what is a local file (a model, dataset or id already uploaded is used as is) and
        starts the job. Without `mode` (here or in `recipe`): `auto` with calibration data, else `dynamic`."""
        model_id = self._model_id(model)
        calibration_id = self._dataset_id(calibration, preprocess)
        evaluation_id = self._dataset_id(evaluation, preprocess)
        recipe = dict(recipe or {})
        if mode:
            recipe["mode"] = mode
        recipe.setdefault("mode", "auto" if calibration_id else "dynamic")
        return self.create_job(
            model_id,
            calibration_dataset_id=calibration_id,
            evaluation_dataset_id=evaluation_id,
            recipe=recipe,
            evaluation_settings=evaluation_settings,
            idempotency_key=idempotency_key,
        )

    def _model_id(self, model: PathLike | Model) -> str:
        if isinstance(model, Model):
            return model.id
        path = _local_file(model)
        return self.upload_model(path).id if path else os.fspath(model)

    def _dataset_id(self, data: PathLike | Dataset | None, preprocess: dict[str, Any] | str | None) -> str | None:
        if data is None or isinstance(data, Dataset):
            return data.id if data else None
        path = _local_file(data)
        return self.upload_dataset(path, preprocess=preprocess).id if path else os.fspath(data)


class Job:
    """A job on the service; `refresh()` and `wait()` bring its fields up to date."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client = client
        self.raw = data
        self._report: Report | None = None

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r}, stage={self.stage!r}, progress={self.progress})"

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def status(self) -> str:
        return str(self.raw["status"])

    @property
    def stage(self) -> str:
        return str(self.raw["stage"])

    @property
    def progress(self) -> float:
        return float(self.raw["progress"])

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    @property
    def error(self) -> dict[str, Any] | None:
        error: dict[str, Any] | None = self.raw.get("error")
        return error

    @property
    def recipe(self) -> dict[str, Any]:
        recipe: dict[str, Any] = self.raw.get("recipe") or {}
        return recipe

    def refresh(self) -> Job:
        self.raw = self.client.http.json("GET", f"/v1/jobs/{self.id}")
        return self

    def updates(self, *, stream: bool = True) -> Iterator[JobUpdate]:
        """The job's progress until it ends: from the event stream, or by polling when there is none."""
        return follow(self.client.http, self.id, stream=stream)

    def wait(
        self,
        *,
        progress: bool = False,
        on_update: Callable[[JobUpdate], None] | None = None,
        raise_on_failure: bool = True,
        stream: bool = True,
    ) -> Job:
        """Blocks until the job ends. `progress` draws a bar on stderr. A failed or cancelled job raises
        JobFailedError / JobCancelledError with the job's error code, unless `raise_on_failure` is False."""
        if not self.done:
            with ExitStack() as stack:
                view = stack.enter_context(ProgressView(self.id)) if progress else None
                for update in self.updates(stream=stream):
                    if view is not None:
                        view.update(update)
                    if on_update is not None:
                        on_update(update)
            self.refresh()
        if raise_on_failure:
            self.raise_for_status()
        return self

    def raise_for_status(self) -> None:
        if self.status in ("failed", "cancelled"):
            error = self.error or {}
            cls = JobCancelledError if self.status == "cancelled" else JobFailedError
            raise cls(
                self.id,
                str(error.get("code") or self.status),
                str(error.get("message") or f"The job was {self.status}."),
                detail=error.get("detail") or {},
            )

    def cancel(self) -> Job:
        self.raw = self.client.http.json("POST", f"/v1/jobs/{self.id}/cancel")
        return self

    def delete(self) -> None:
        """Removes the job and its artifacts (the service refuses while it is queued or running)."""
        self.client.http.send("DELETE", f"/v1/jobs/{self.id}")

    def artifacts(self) -> list[Artifact]:
        return [Artifact.from_json(a) for a in self.client.http.json("GET", f"/v1/jobs/{self.id}/artifacts")]

    @property
    def report(self) -> Report:
        """Sizes, latency, fidelity per output, accuracy and warnings of a succeeded job."""
        if self._report is None:
            self._report = Report.from_json(self.client.http.json("GET", f"/v1/jobs/{self.id}/report"))
        return self._report

    def report_html(self) -> str:
        return self.client.http.send("GET", f"/v1/jobs/{self.id}/report.html").text

    def download(self, dest: PathLike = ".") -> Path:
        """Saves the quantized model and returns its path. `dest` is a folder (the file keeps its name
        `quantized.onnx`) or a file name; external data files land beside it under their own names,
        as the model refers to them, which must be plain file names (UnsafeResponseError otherwise,
        before anything is saved). Each file's sha256 is checked against the service's."""
        artifacts = {a.name: a for a in self.artifacts()}
        if MODEL_FILE not in artifacts:
            raise QaasError(
                "no_artifact",
                f"Job {self.id} has no {MODEL_FILE} (status {self.status}); only a succeeded job has one.",
            )
        target = Path(dest)
        if target.is_dir() or os.fspath(dest).endswith(("/", os.sep)):
            target = target / MODEL_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        beside = [
            (artifact, _saved_path(target.parent, artifact.name))
            for artifact in artifacts.values()
            if artifact.name != MODEL_FILE and artifact.media_type == MODEL_MEDIA_TYPE
        ]
        for artifact, path in [(artifacts[MODEL_FILE], target), *beside]:
            self._fetch(artifact, path)
        return target

    def _fetch(self, artifact: Artifact, target: Path) -> None:
        # The URL is built from the job and the name, not taken from the listing: the API key goes
        # with it, so it must lead to the service (`Http.download` drops the key on a redirect elsewhere).
        url = f"/v1/jobs/{quote(self.id, safe='')}/artifacts/{quote(artifact.name, safe='')}"
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                response = self.client.http.download(url)
                try:
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                finally:
                    response.close()
            if digest.hexdigest() != artifact.sha256:
                raise QaasError(
                    "checksum_mismatch",
                    f"{artifact.name} arrived with sha256 {digest.hexdigest()}, the service says "
                    f"{artifact.sha256}; download it again.",
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
