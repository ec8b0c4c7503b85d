"""The `qaas` command as a user runs it (a subprocess), against the real API and worker processes with
auth on, on the embedded default and on PostgreSQL + Redis."""

from __future__ import annotations

import hashlib
import json
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from qaas_client import AuthenticationError, Client, ConflictError, JobCancelledError, NotFoundError
from service import auth
from service.database import make_engine, make_session_factory, transaction
from service.settings import Settings
from tests.conftest import clean_qaas_env, redis_prefix
from tests.e2e.conftest import Deployment, deploy
from tests.onnx_models import conv_classifier, matmul_mlp
from tests.service.helpers import npz_bytes

pytestmark = pytest.mark.e2e
QAAS = Path(sys.executable).with_name("qaas")  # the console script `make install` puts beside python
SLOW_RUNS = 5_000


@pytest.fixture(scope="module", params=["embedded", pytest.param("production", marks=pytest.mark.services)])
def cli_deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp(f"cli-{request.param}")
    # Long latency runs are allowed so that one test's job runs for seconds (long enough to interrupt).
    if request.param == "embedded":
        yield from deploy("embedded", root, QAAS_AUTH="on", QAAS_MAX_LATENCY_RUNS=str(SLOW_RUNS))
    else:
        yield from deploy(
            "production",
            root,
            QAAS_AUTH="on",
            QAAS_MAX_LATENCY_RUNS=str(SLOW_RUNS),
            QAAS_DATABASE_URL=request.getfixturevalue("postgres_url"),
            QAAS_BROKER_URL=request.getfixturevalue("redis_url"),
            QAAS_BROKER_KEY_PREFIX=redis_prefix(),
        )


def create_key(dep: Deployment, tenant: str) -> str:
    """A key made in the deployment's database, as `python -m service.admin create-key` makes them."""
    settings = Settings(data_dir=dep.data_dir, database_url=dep.env.get("QAAS_DATABASE_URL"))
    engine = make_engine(settings)
    try:
        with transaction(make_session_factory(engine)) as session:
            return auth.create_key(session, tenant).key
    finally:
        engine.dispose()


def _default_sigint() -> None:
    """A command started from a background shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: Ctrl-C (the tests' SIGINT) must reach the CLI as it does on a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Qaas:
    """Runs `qaas` in `home` (its working folder and config folder) with the service's URL and a key."""

    dep: Deployment
    key: str
    home: Path

    def env(self, **overrides: str) -> dict[str, str]:
        env = {"QAAS_URL": self.dep.base_url, "QAAS_API_KEY": self.key, "COLUMNS": "200"}
        env.update(overrides)
        return clean_qaas_env(XDG_CONFIG_HOME=str(self.home / "config"), **{k: v for k, v in env.items() if v})

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(QAAS), *args], env=self.env(**env), cwd=self.home, capture_output=True, text=True, timeout=240
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(QAAS), *args],
            env=self.env(),
            cwd=self.home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )

    def http(self) -> httpx.Client:
        return self.dep.client({"Authorization": f"Bearer {self.key}"})


# The main flows run on both deployments; the CLI's own behaviours (exit codes, Ctrl-C, cancel,
# login), which do not depend on the database or the broker, on the embedded default only.
EMBEDDED_ONLY = pytest.mark.parametrize("cli_deployment", ["embedded"], indirect=True)


@pytest.fixture
def qaas(cli_deployment: Deployment, tmp_path: Path) -> Qaas:
    """A tenant of its own for each test, so that lists hold only what the test made."""
    return Qaas(cli_deployment, create_key(cli_deployment, f"t-{tmp_path.name}"), tmp_path)


def calibration(path: Path, n: int = 16, size: int = 8) -> Path:
    rng = np.random.default_rng(3)
    samples = rng.random((n, 1, 3, size, size), dtype=np.float32)
    path.write_bytes(npz_bytes(input=samples, __labels__=np.arange(n, dtype=np.int64) % 4))
    return path


def test_quantize_saves_the_model_and_prints_what_it_cost(qaas: Qaas) -> None:
    model = conv_classifier(qaas.home / "classifier.onnx", hidden=16)
    calib = calibration(qaas.home / "calib.npz")
    evaluation = calibration(qaas.home / "eval.npz", n=8)
    recipe = {"recipe": {"mode": "dynamic", "per_channel": True}, "evaluation": {"latency_runs": 5, "warmup_runs": 1}}
    (qaas.home / "recipe.json").write_text(json.dumps(recipe))
    done = qaas("-v", "quantize", model.name, "--calib", calib.name, "--eval", evaluation.name, "--mode", "static",
                "--recipe-file", "recipe.json", "-o", "out/classifier_int8.onnx")  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr, qaas.dep.log_tail())
    assert "through its event stream" in done.stderr and "polling" not in done.stderr, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("job ")]
    assert progress[-1].endswith("succeeded 100%"), done.stderr
    for words in ("size", "speedup", "logits: cosine", "top1:", "warnings"):
        assert words in done.stdout, done.stdout

    job_id = done.stdout.split()[1]
    saved = qaas.home / "out" / "classifier_int8.onnx"
    with qaas.http() as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        artifacts = {a["name"]: a for a in http.get(f"/v1/jobs/{job_id}/artifacts").json()}
        report = http.get(f"/v1/jobs/{job_id}/report").json()
    assert job["status"] == "succeeded" and job["evaluation"]["latency_runs"] == 5
    assert (job["recipe"]["mode"], job["recipe"]["per_channel"]) == ("static", True)  # --mode over the file
    assert job["evaluation_dataset_id"] != job["calibration_dataset_id"]
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifacts["quantized.onnx"]["sha256"]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(saved)).graph.node}
    assert f"{report['comparison']['speedup_p50']:.2f}x" in done.stdout

    as_json = qaas("report", job_id, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == report
    page = qaas.home / "report.html"
    browser = qaas.home / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {qaas.home / "opened"}\n')
    browser.chmod(0o755)
    opened = qaas("report", job_id, "--open", "--html", str(page), BROWSER=str(browser))
    assert opened.returncode == 0, opened.stderr
    assert job_id in page.read_text() and (qaas.home / "opened").read_text().strip() == page.resolve().as_uri()


def test_jobs_models_and_datasets_are_listed_followed_and_deleted(qaas: Qaas) -> None:
    model = matmul_mlp(qaas.home / "mlp.onnx")
    detached = qaas("quantize", model.name, "--mode", "dynamic", "--latency-runs", "3", "--detach")
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    waited = qaas("jobs", "wait", job_id, "-o", "mlp_int8.onnx")
    assert waited.returncode == 0, (waited.stderr, qaas.dep.log_tail())
    assert (qaas.home / "mlp_int8.onnx").stat().st_size > 0 and "speedup" in waited.stdout

    listed = json.loads(qaas("jobs", "list", "--json").stdout)
    assert [(j["id"], j["status"]) for j in listed] == [(job_id, "succeeded")]
    model_id = listed[0]["model_id"]
    assert job_id in qaas("jobs", "list").stdout and "succeeded" in qaas("jobs", "show", job_id).stdout
    assert [m["id"] for m in json.loads(qaas("models", "list", "--json").stdout)] == [model_id]
    dataset_id = qaas("datasets", "upload", str(calibration(qaas.home / "c.npz"))).stdout.strip()
    assert [d["id"] for d in json.loads(qaas("datasets", "list", "--json").stdout)] == [dataset_id]
    usage = json.loads(qaas("usage", "--json").stdout)
    assert (usage["models"], usage["datasets"], usage["jobs"]["succeeded"]) == (1, 1, 1)
    assert "1 models, 1 datasets" in qaas("usage").stdout

    assert qaas("jobs", "delete", job_id).returncode == 0
    assert qaas("models", "delete", model_id).returncode == 0
    assert qaas("datasets", "delete", dataset_id).returncode == 0
    with qaas.http() as http:
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404
        assert http.get(f"/v1/models/{model_id}").status_code == 404
        assert http.get(f"/v1/datasets/{dataset_id}").status_code == 404
    again = qaas("jobs", "show", job_id)
    assert again.returncode == 1 and "[not_found]" in again.stderr


@EMBEDDED_ONLY
def test_failures_exit_non_zero_with_the_service_message(qaas: Qaas) -> None:
    missing = qaas("quantize", "missing.onnx")
    assert missing.returncode == 1 and "No such file: missing.onnx" in missing.stderr, missing.stderr
    model = conv_classifier(qaas.home / "classifier.onnx")
    refused = qaas("quantize", model.name, "--mode", "static")
    assert refused.returncode == 1
    assert "calibration" in refused.stderr and "[invalid_recipe]" in refused.stderr, refused.stderr

    # The graph declares 4 input channels but its Conv weights expect 3: accepted at upload, it
    # fails when the worker calibrates.
    broken = onnx.load(str(model))
    broken.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    onnx.save(broken, str(qaas.home / "broken.onnx"))
    samples = np.random.default_rng(0).random((4, 1, 4, 8, 8), dtype=np.float32)
    (qaas.home / "d.npz").write_bytes(npz_bytes(input=samples))
    failed = qaas("quantize", "broken.onnx", "--calib", "d.npz", "--mode", "static", "-o", "never.onnx")
    assert failed.returncode == 1, failed.stdout
    assert "[quantization_failed]" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    assert not (qaas.home / "never.onnx").exists()


def _start_slow_job(qaas: Qaas) -> tuple[subprocess.Popen[str], str]:
    """`qaas quantize` of a job that runs for seconds, returned once the job exists."""
    model = conv_classifier(qaas.home / "big.onnx", size=48, hidden=64)
    calib = calibration(qaas.home / "big.npz", n=8, size=48)
    proc = qaas.start(
        "quantize", model.name, "--calib", calib.name, "--mode", "static", "--latency-runs", str(SLOW_RUNS)
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("Job ") and "created" in line:
            return proc, line.split()[1]
    proc.wait(30)
    raise AssertionError(f"no job was created: {proc.returncode}")


@EMBEDDED_ONLY
def test_ctrl_c_asks_whether_to_cancel_the_job(qaas: Qaas) -> None:
    proc, job_id = _start_slow_job(qaas)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate("y\n", timeout=120)
    assert proc.returncode == 130, stderr
    assert f"Cancel job {job_id}?" in stderr and "cancelled" in stderr
    with qaas.http() as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"

    # Answering no leaves the job running; `qaas jobs wait` picks it up again.
    proc, job_id = _start_slow_job(qaas)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate("n\n", timeout=120)
    assert proc.returncode == 130 and f"qaas jobs wait {job_id}" in stderr, stderr
    waited = qaas("jobs", "wait", job_id)
    assert waited.returncode == 0 and "succeeded" in waited.stdout, waited.stderr


@EMBEDDED_ONLY
def test_jobs_cancel_stops_a_running_job_which_delete_refuses_until_then(qaas: Qaas) -> None:
    model = conv_classifier(qaas.home / "big.onnx", size=48, hidden=64)
    calib = calibration(qaas.home / "big.npz", n=8, size=48)
    started = qaas("quantize", model.name, "--calib", calib.name, "--mode", "static",
                   "--latency-runs", str(SLOW_RUNS), "--detach")  # fmt: skip
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    refused = qaas("jobs", "delete", job_id)
    assert refused.returncode == 1 and "[conflict]" in refused.stderr and "cancel" in refused.stderr, refused.stderr
    cancelled = qaas("jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and f"Job {job_id}: cancel requested" in cancelled.stdout, cancelled.stderr
    waited = qaas("jobs", "wait", job_id)
    assert waited.returncode == 1 and "[cancelled]" in waited.stderr, (waited.stdout, waited.stderr)
    assert qaas("jobs", "delete", job_id).returncode == 0
    with qaas.http() as http:
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_the_python_client_as_the_issue_shows_it(
    qaas: Qaas, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`Client(url, api_key=key).quantize(...)`, `job.wait(progress=True)`, `job.download("out/")`,
    `job.report`, against the real processes; failures raise typed errors carrying the service's code."""
    monkeypatch.chdir(qaas.home)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(qaas.home / "config"))
    conv_classifier(qaas.home / "m.onnx", hidden=16)
    calibration(qaas.home / "c.npz")
    url, key = qaas.dep.base_url, qaas.key

    job = Client(url, api_key=key).quantize("m.onnx", calibration="c.npz", mode="auto")
    job.wait(progress=True)
    job.download("out/")
    report = job.report
    job.client.close()  # the one-liner leaves the connection to the garbage collector

    assert job.status == "succeeded" and job.recipe["mode"] == "auto"
    assert f"job {job.id}: succeeded 100%" in capsys.readouterr().err  # the progress (not a terminal: lines)
    with qaas.http() as http:
        artifacts = {a["name"]: a for a in http.get(f"/v1/jobs/{job.id}/artifacts").json()}
        assert report.raw == http.get(f"/v1/jobs/{job.id}/report").json()
    saved = qaas.home / "out" / "quantized.onnx"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifacts["quantized.onnx"]["sha256"]
    assert report.auto_verdict in ("quantized", "keep_float") and report.speedup_p50 is not None
    assert [o.name for o in report.outputs] == ["logits"] and report.outputs[0].cosine is not None
    assert report.accuracy is not None and report.accuracy.metric == "top1"  # c.npz has __labels__

    with Client(url, api_key=key) as client:
        with pytest.raises(NotFoundError) as missing:
            client.get_job("no-such-job")
        assert missing.value.code == "not_found" and missing.value.status == 404
        slow = client.quantize("m.onnx", "c.npz", mode="static", evaluation_settings={"latency_runs": SLOW_RUNS})
        with pytest.raises(ConflictError) as busy:
            slow.delete()
        assert busy.value.code == "conflict" and busy.value.status == 409
        slow.cancel()
        with pytest.raises(JobCancelledError) as stopped:
            slow.wait()
        assert stopped.value.code == "cancelled"
    with pytest.raises(AuthenticationError) as refused, Client(url, api_key="qaas_00000000_nope") as stranger:
        list(stranger.list_models())
    assert refused.value.code == "unauthorized"


@EMBEDDED_ONLY
def test_login_saves_the_url_and_key_and_the_environment_overrides_them(qaas: Qaas) -> None:
    url, key = qaas.dep.base_url, qaas.key
    saved = qaas.home / "config" / "qaas" / "config.json"
    wrong = qaas("login", "--url", url, "--api-key", "qaas_00000000_nope", QAAS_URL="", QAAS_API_KEY="")
    assert wrong.returncode == 1 and "refused the key" in wrong.stderr and not saved.exists()

    login = qaas("login", "--url", url, "--api-key", key, QAAS_URL="", QAAS_API_KEY="")
    assert login.returncode == 0, login.stderr
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {"url": url, "api_key": key}
    assert qaas("models", "list", QAAS_URL="", QAAS_API_KEY="").returncode == 0  # the saved login is used

    overridden = qaas("models", "list", QAAS_URL="", QAAS_API_KEY="qaas_00000000_nope")
    assert overridden.returncode == 1 and "[unauthorized]" in overridden.stderr

    # Another tenant's key sees nothing of this one's.
    with qaas.http() as http:
        files = {"file": ("m.onnx", conv_classifier(qaas.home / "m.onnx").read_bytes())}
        model_id = http.post("/v1/models", files=files).json()["id"]
    other = create_key(qaas.dep, "globex")
    assert json.loads(qaas("models", "list", "--json", QAAS_API_KEY=other).stdout) == []
    stranger = qaas("models", "delete", model_id, QAAS_API_KEY=other)
    assert stranger.returncode == 1 and "[not_found]" in stranger.stderr

    assert qaas("logout").returncode == 0 and not saved.exists()
