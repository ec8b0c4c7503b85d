"""The `qaas` command: quantize a model in one line, and look after models, datasets and jobs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from qaas_client import config, render
from qaas_client.client import Client, Job
from qaas_client.errors import AuthenticationError, ConflictError, InsecureTransportWarning, QaasError
from qaas_client.progress import ProgressView
from qaas_client.types import Dataset, Model

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C
TABLE_WIDTH_PIPED = 240

# No markup: what is printed holds the service's strings (names, messages, warnings), shown as they are.
out = Console(highlight=False, markup=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
wide = Console(highlight=False, markup=False, width=TABLE_WIDTH_PIPED)


def _notify_retry(why: str, wait_s: float, retry: int) -> None:
    err.print(f"qaas: {why}; retrying in {wait_s:.0f} s (retry {retry})")


class QaasGroup(click.Group):
    """Turns the client's typed errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QaasError as exc:
            raise click.ClickException(f"{exc.message} [{exc.code}]") from exc
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from exc


def _connect(url: str | None, api_key: str | None, **options: Any) -> Client:
    """A Client; its warning that the key would travel unencrypted is one line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InsecureTransportWarning)
        client = Client(url, api_key, **options)
    for warning in caught:
        if issubclass(warning.category, InsecureTransportWarning):
            err.print(f"qaas: warning: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return client


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().ensure_object(dict)
    if "client" not in obj:
        obj["client"] = ctx.with_resource(_connect(obj.get("url"), obj.get("api_key"), on_retry=_notify_retry))
    client: Client = obj["client"]
    return client


def _print_table(table: Table) -> None:
    """On a terminal, fitted to its width; piped, one line per row however wide."""
    (out if out.is_terminal else wide).print(table)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


F = TypeVar("F", bound=Callable[..., Any])


def list_options(command: F) -> F:
    """`--limit` and `--json`, shared by the list commands."""
    command = click.option("--json", "as_json", is_flag=True, help="Print the JSON.")(command)
    return click.option("--limit", type=click.IntRange(1), default=50, show_default=True)(command)


def _show(found: Sequence[Model | Dataset | Job], as_json: bool, table: Callable[[Any], Table]) -> None:
    if as_json:
        _echo_json([item.raw for item in found])
    else:
        _print_table(table(found))


def _delete_each(ids: Sequence[str], delete: Callable[[str], None], noun: str) -> None:
    for item_id in ids:
        delete(item_id)
        out.print(f"Deleted {noun} {item_id}")


@click.group(cls=QaasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", metavar="URL", help="The service (default: $QAAS_URL, then `qaas login`'s, then local).")
@click.option("--api-key", metavar="KEY", help="API key (default: $QAAS_API_KEY, then `qaas login`'s).")
@click.option("-v", "--verbose", is_flag=True, help="Say how jobs are followed and requests retried.")
@click.version_option(package_name="qaas-client", prog_name="qaas")
@click.pass_context
def cli(ctx: click.Context, url: str | None, api_key: str | None, verbose: bool) -> None:
    """QaaS: quantize ONNX models on a QaaS service and read what it cost."""
    ctx.ensure_object(dict).update(url=url, api_key=api_key)
    if verbose:
        logging.basicConfig(format="qaas: %(message)s")
        logging.getLogger("qaas_client").setLevel(logging.INFO)


# login


@cli.command()
@click.option("--url", "new_url", metavar="URL", help="Service URL; asked for when not given.")
@click.option("--api-key", "new_key", metavar="KEY", help="API key; asked for (hidden) when not given.")
@click.option("--no-verify", is_flag=True, help="Save without checking that the service accepts the key.")
def login(new_url: str | None, new_key: str | None, no_verify: bool) -> None:
    """Save the service URL and API key for later commands (file readable by you only).

    QAAS_URL and QAAS_API_KEY, when set, override what is saved."""
    current = config.load_saved()
    url = new_url or click.prompt("Service URL", default=current.url if current else config.DEFAULT_URL, err=True)
    key = new_key
    if key is None:
        key = click.prompt(
            "API key (empty when auth is off)", default="", show_default=False, hide_input=True, err=True
        )
    connection = config.Connection(url.rstrip("/"), key or None)
    if not no_verify:
        with _connect(connection.url, connection.api_key or "", max_retries=1) as client:
            try:
                next(client.list_models(limit=1), None)
            except AuthenticationError as exc:
                raise click.ClickException(f"{connection.url} refused the key: {exc.message} Nothing saved.") from exc
    path = config.save(connection)
    err.print(f"Saved {connection.url} {'with' if connection.api_key else 'without'} an API key to {path}")


@cli.command()
def logout() -> None:
    """Forget the saved URL and API key."""
    path = config.config_path()
    err.print(f"Removed {path}" if config.forget() else f"Nothing saved at {path}")


# quantize


def _recipe_from_file(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe, evaluation settings) from a JSON file holding a recipe, or a job body with both."""
    if path is None:
        return {}, {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}", param_hint="--recipe-file") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a JSON object (a recipe)", param_hint="--recipe-file")
    if isinstance(data.get("recipe"), dict):
        return dict(data["recipe"]), dict(data.get("evaluation") or {})
    return data, {}


def _follow(job: Job, announce: str | None = None) -> None:
    """Shows the job's progress until it ends. Ctrl-C asks whether to cancel it; either way the
    command then stops with status 130."""
    try:
        if announce:
            err.print(announce)
        with ProgressView(job.id, err) as view:
            for update in job.updates():
                view.update(update)
    except KeyboardInterrupt:
        _interrupted(job)
    job.refresh()


def _interrupted(job: Job) -> NoReturn:
    try:
        cancel = click.confirm(f"\nCancel job {job.id}?", default=False, err=True)
    except (click.Abort, KeyboardInterrupt, EOFError):
        cancel = False
    if cancel:
        with contextlib.suppress(ConflictError):  # it ended meanwhile
            job.cancel()
        with contextlib.suppress(KeyboardInterrupt):
            for _ in job.updates(stream=False):
                pass
        err.print(f"Job {job.id} {job.refresh().status}.")
    else:
        err.print(f"Job {job.id} goes on; follow it with `qaas jobs wait {job.id}`.")
    sys.exit(INTERRUPTED)


def _print_outcome(job: Job, saved: Path | None) -> None:
    job.raise_for_status()
    report = job.report
    chosen = f", mode {job.recipe.get('mode')}" if job.recipe.get("mode") else ""
    out.print(f"Job {job.id} succeeded{chosen}.")
    if saved is not None:
        out.print(f"Quantized model saved to {saved}")
    out.print(render.summary(report))
    out.print(f"Report: {job.client.url}/v1/jobs/{job.id}/report.html (`qaas report {job.id} --open`)")


@cli.command()
@click.argument("model", metavar="MODEL.onnx")
@click.option("--calib", metavar="DATA", help="Calibration data: .npz, .npy, .zip of images, or a dataset id.")
@click.option("--eval", "evaluation", metavar="DATA", help="Evaluation data (default: the calibration data).")
@click.option("--mode", help="static, dynamic, weight_only, fp16, auto... (default: auto with --calib, else dynamic).")
@click.option(
    "--recipe-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON recipe (or a job body with `recipe` and `evaluation`); --mode overrides its mode.",
)
@click.option("--preprocess", metavar="JSON", help="Preprocessing of an image .zip, as JSON.")
@click.option("--latency-runs", type=click.IntRange(1), help="Timed runs of each model.")
@click.option("--warmup-runs", type=click.IntRange(0), help="Untimed runs first.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to save the quantized model (default: MODEL_quantized.onnx here; a folder keeps quantized.onnx).",
)
@click.option("--detach", is_flag=True, help="Start the job, print its id and return.")
@click.pass_context
def quantize(
    ctx: click.Context,
    model: str,
    calib: str | None,
    evaluation: str | None,
    mode: str | None,
    recipe_file: Path | None,
    preprocess: str | None,
    latency_runs: int | None,
    warmup_runs: int | None,
    output: Path | None,
    detach: bool,
) -> None:
    """Upload MODEL.onnx (and data), quantize it, show progress, save the result and print what it cost.

    MODEL.onnx and DATA may also be ids of a model or dataset uploaded before."""
    client = _client(ctx)
    recipe, evaluation_settings = _recipe_from_file(recipe_file)
    if latency_runs is not None:
        evaluation_settings["latency_runs"] = latency_runs
    if warmup_runs is not None:
        evaluation_settings["warmup_runs"] = warmup_runs
    job = client.quantize(
        model,
        calib,
        evaluation,
        mode=mode,
        recipe=recipe,
        evaluation_settings=evaluation_settings or None,
        preprocess=preprocess,
    )
    created = f"Job {job.id} created (mode {job.recipe.get('mode')})."
    if detach:
        err.print(created)
        click.echo(job.id)
        return
    _follow(job, announce=created)
    if job.status != "succeeded":
        job.raise_for_status()
    target = output or Path(f"{Path(model).stem}_quantized.onnx")
    saved = job.download(target)
    _print_outcome(job, saved)


# jobs


@cli.group()
def jobs() -> None:
    """List, inspect, follow, cancel and delete jobs."""


@jobs.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]))
@click.option("--model", "model_id", metavar="MODEL_ID", help="Only jobs of this model.")
@list_options
@click.pass_context
def jobs_list(ctx: click.Context, status: str | None, model_id: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    _show(list(_client(ctx).list_jobs(status=status, model_id=model_id, limit=limit)), as_json, render.jobs_table)


@jobs.command("show")
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON.")
@click.pass_context
def jobs_show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """One job: state, error or result summary."""
    job = _client(ctx).get_job(job_id)
    if as_json:
        _echo_json(job.raw)
        return
    _print_table(render.jobs_table([job]))
    if job.error:
        out.print(f"error: {job.error.get('message')} [{job.error.get('code')}]")
    if job.status == "succeeded":
        out.print(render.summary(job.report))


@jobs.command("wait")
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Also save the quantized model here.")
@click.pass_context
def jobs_wait(ctx: click.Context, job_id: str, output: Path | None) -> None:
    """Follow a job until it ends; exits non-zero if it fails."""
    job = _client(ctx).get_job(job_id)
    _follow(job)
    job.raise_for_status()
    _print_outcome(job, job.download(output) if output else None)


@jobs.command("download")
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.pass_context
def jobs_download(ctx: click.Context, job_id: str, output: Path) -> None:
    """Save a succeeded job's quantized model (and its external data files)."""
    out.print(f"Saved {_client(ctx).get_job(job_id).download(output)}")


@jobs.command("cancel")
@click.argument("job_id", metavar="JOB")
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a queued or running job."""
    job = _client(ctx).get_job(job_id).cancel()
    out.print(f"Job {job.id}: cancel requested (status {job.status}).")


@jobs.command("delete")
@click.argument("job_ids", metavar="JOB...", nargs=-1, required=True)
@click.pass_context
def jobs_delete(ctx: click.Context, job_ids: tuple[str, ...]) -> None:
    """Delete ended jobs and their artifacts (cancel running ones first)."""
    client = _client(ctx)
    _delete_each(job_ids, lambda job_id: client.get_job(job_id).delete(), "job")


# report


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--open", "open_page", is_flag=True, help="Open the HTML report in a browser.")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path), help="Save the HTML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's JSON.")
@click.pass_context
def report(ctx: click.Context, job_id: str, open_page: bool, html: Path | None, as_json: bool) -> None:
    """A succeeded job's report: size, latency, fidelity per output, accuracy, warnings."""
    job = _client(ctx).get_job(job_id)
    if html or open_page:
        # The page is fetched with the key and saved, since a browser cannot send the key itself.
        content = job.report_html()
        if html is None:
            page = _private_file(content, suffix=".html")
        else:
            page = html
            page.write_text(content, encoding="utf-8")
        err.print(f"Report saved to {page}")
        if open_page and not webbrowser.open(page.resolve().as_uri()):
            raise click.ClickException(f"No browser could be started; open {page} yourself.")
        return
    if as_json:
        _echo_json(job.report.raw)
    else:
        _print_outcome(job, None)


def _private_file(content: str, *, suffix: str) -> Path:
    """A new file readable by its owner only (0600), in a new folder of its own (0700) under the temp
    directory: no name another user of the machine could guess and plant a link at beforehand."""
    folder = tempfile.mkdtemp(prefix="qaas-report-")
    fd, name = tempfile.mkstemp(dir=folder, prefix="report-", suffix=suffix)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)
    return Path(name)


# models and datasets


@cli.group()
def models() -> None:
    """Uploaded models."""


@models.command("list")
@list_options
@click.pass_context
def models_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Models, newest first."""
    _show(list(_client(ctx).list_models(limit=limit)), as_json, render.models_table)


@models.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Default: the file name.")
@click.option(
    "--external-data",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding weights outside the .onnx (repeat), or one .zip of them.",
)
@click.pass_context
def models_upload(ctx: click.Context, path: Path, name: str | None, external_data: tuple[Path, ...]) -> None:
    """Upload an .onnx model; prints its id."""
    model = _client(ctx).upload_model(path, name=name, external_data=external_data)
    click.echo(model.id)


@models.command("delete")
@click.argument("model_ids", metavar="MODEL...", nargs=-1, required=True)
@click.pass_context
def models_delete(ctx: click.Context, model_ids: tuple[str, ...]) -> None:
    """Delete models and their files (refused while a queued or running job uses one)."""
    _delete_each(model_ids, _client(ctx).delete_model, "model")


@cli.group()
def datasets() -> None:
    """Uploaded calibration and evaluation data."""


@datasets.command("list")
@list_options
@click.pass_context
def datasets_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Datasets, newest first."""
    _show(list(_client(ctx).list_datasets(limit=limit)), as_json, render.datasets_table)


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Default: the file name.")
@click.option("--preprocess", metavar="JSON", help="Preprocessing of an image .zip, as JSON.")
@click.pass_context
def datasets_upload(ctx: click.Context, path: Path, name: str | None, preprocess: str | None) -> None:
    """Upload .npz, .npy or a .zip of images; prints its id."""
    click.echo(_client(ctx).upload_dataset(path, name=name, preprocess=preprocess).id)


@datasets.command("delete")
@click.argument("dataset_ids", metavar="DATASET...", nargs=-1, required=True)
@click.pass_context
def datasets_delete(ctx: click.Context, dataset_ids: tuple[str, ...]) -> None:
    """Delete datasets (refused while a queued or running job uses one)."""
    _delete_each(dataset_ids, _client(ctx).delete_dataset, "dataset")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the JSON.")
@click.pass_context
def usage(ctx: click.Context, as_json: bool) -> None:
    """Your stored bytes, job counts and quotas."""
    found = _client(ctx).usage()
    if as_json:
        _echo_json(found)
        return
    storage, jobs_by_status = found["storage"], found["jobs"]
    out.print(render.usage_grid(found["tenant"], storage, jobs_by_status, found["models"], found["datasets"]))


def main() -> None:
    cli(prog_name="qaas")
