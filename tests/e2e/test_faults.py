"""Jobs survive faults: real API and worker processes on real PostgreSQL and Redis, while workers
are SIGKILLed or SIGTERMed, Redis crashes and PostgreSQL disappears. Nothing is lost, nothing
stays stuck, nothing is done twice.

Every deployment has a Redis of its own (never the machine's shared one, which a crash would
take from other test runs) and a database of its own. Leases, sweeps and re-sends are shortened
(`FAST`) so that recovery takes seconds; long jobs measure latency until
QAAS_EVALUATION_MAX_SECONDS stops them."""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from service.queue import QUEUE, RUN_JOB_TASK, make_celery
from service.run import WORKER
from service.settings import Settings
from tests.conftest import fresh_database, unavailable
from tests.e2e.conftest import TERMINAL, Deployment, deploy
from tests.e2e.faults import PrivateRedis, TcpProxy, alive, descendants, job_processes, wait_gone
from tests.onnx_models import matmul_mlp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

FAST = {
    "QAAS_JOB_LEASE_S": "2",
    "QAAS_SWEEP_INTERVAL_S": "0.5",
    "QAAS_QUEUED_RESEND_S": "600",  # the tests show what delivers lost messages sooner than this
    "QAAS_JOB_MAX_ATTEMPTS": "3",
    "QAAS_WORKER_SHUTDOWN_GRACE_S": "1",
    "QAAS_MAX_LATENCY_RUNS": "100000",
    "QAAS_EVALUATION_MAX_SECONDS": "3",
    "QAAS_LOG_LEVEL": "info",
}
LONG = {"latency_runs": 100000, "warmup_runs": 0, "threads": 1}  # measures until max seconds
SHORT = {"latency_runs": 3, "warmup_runs": 0, "threads": 1}


# -- fixtures ---------------------------------------------------------------------------------------


def private_redis(folder: Path) -> Iterator[PrivateRedis]:
    try:
        server = PrivateRedis(folder)
    except FileNotFoundError as exc:  # the fault tests start a Redis of their own, to crash it
        unavailable("redis-server", exc, "install redis-server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    yield from private_redis(tmp_path / "redis")


@pytest.fixture
def database_url(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


def production(root: Path, database_url: str, redis: PrivateRedis, **env: str) -> Iterator[Deployment]:
    yield from deploy(
        "production",
        root / "deployment",
        **{**FAST, "QAAS_DATABASE_URL": database_url, "QAAS_BROKER_URL": redis.url, **env},
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Deployment]:
    """One production deployment (two job slots) for the faults that leave Redis and PostgreSQL
    alone; each test starts its worker again if the one before killed it."""
    root = tmp_path_factory.mktemp("faults-shared")
    for redis in private_redis(root / "redis"):
        for url in fresh_database(postgres_url):
            yield from production(root, url, redis, QAAS_WORKER_CONCURRENCY="2")


@pytest.fixture
def dep(shared: Deployment) -> Deployment:
    if shared.procs["worker"].poll() is not None:
        shared.start("worker", WORKER)
        shared.wait_ready()
    return shared


# -- helpers ----------------------------------------------------------------------------------------


def upload_model(http: httpx.Client, tmp_path: Path) -> str:
    """An 8 MB MLP: quick enough a run that LONG jobs measure until QAAS_EVALUATION_MAX_SECONDS on
    any machine, rather than finishing their runs early on a fast one."""
    path = matmul_mlp(tmp_path / f"mlp-{uuid.uuid4().hex[:6]}.onnx", features=512, hidden=2048)
    response = http.post("/v1/models", files={"file": ("mlp.onnx", path.read_bytes())})
    assert response.status_code == 201, response.text
    model_id: str = response.json()["id"]
    return model_id


def create_job(http: httpx.Client, model_id: str, evaluation: dict[str, Any]) -> str:
    body = {"model_id": model_id, "recipe": {"mode": "dynamic"}, "evaluation": evaluation}
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_job(
    http: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float, dep: Deployment
) -> dict[str, Any]:
    """Poll the job until `until(job)`; answers other than 200 (an outage) are polled through."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = http.get(f"/v1/jobs/{job_id}")
            if response.status_code == 200:
                job = response.json()
                if until(job):
                    return job
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there in {timeout} s; last seen {job}\n{dep.log_tail()}")


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in TERMINAL


def measuring(attempt: int) -> Callable[[dict[str, Any]], bool]:
    """The job's process is in the middle of its work (evaluating) in the given attempt."""
    return lambda job: (job["status"], job["stage"], job["attempts"]) == ("running", "evaluating", attempt)


def stored_attempts(dep: Deployment, job_id: str) -> list[str]:
    folder = dep.data_dir / "storage" / "jobs" / job_id
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def scratch(dep: Deployment, job_id: str) -> list[Path]:
    folder = dep.data_dir / "work" / job_id
    return sorted(folder.rglob("*")) if folder.exists() else []


def assert_one_clean_success(http: httpx.Client, dep: Deployment, job: dict[str, Any], attempts: int) -> None:
    """Succeeded once: one set of artifacts, stored under the winning attempt only, downloadable."""
    assert job["status"] == "succeeded", (job, dep.log_tail())
    assert job["attempts"] == attempts, job
    artifacts = http.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert sorted(a["name"] for a in artifacts) == ["quantized.onnx", "report.json"]
    assert stored_attempts(dep, job["id"]) == [str(attempts)]  # nothing left by a lost attempt
    content = http.get(f"/v1/jobs/{job['id']}/artifacts/quantized.onnx").content
    assert len(content) == next(a["size_bytes"] for a in artifacts if a["name"] == "quantized.onnx")


def worker_log(dep: Deployment) -> str:
    return (dep.logs / "worker.log").read_text(errors="replace")


def attempts_started(dep: Deployment, job_id: str) -> list[int]:
    """Every attempt the workers' logs say they started for the job, in order."""
    return [int(n) for n in re.findall(rf"job {job_id}: attempt (\d+) started", worker_log(dep))]


def wait_log(dep: Deployment, pattern: str, times: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, worker_log(dep))) < times:
        assert time.monotonic() < deadline, f"the worker never logged {pattern!r} {times}x\n{dep.log_tail()}"
        time.sleep(0.1)


def send_again(dep: Deployment, job_id: str, times: int) -> None:
    """Deliver the job's task message again, as a broker that delivers at least once may."""
    celery = make_celery(Settings(data_dir=dep.data_dir, broker_url=dep.env["QAAS_BROKER_URL"]), "qaas-test")
    try:
        for _ in range(times):
            celery.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE)
    finally:
        celery.close()


def kill_worker(dep: Deployment) -> None:
    """SIGKILL the worker's main process; its pool processes and the job's process must follow."""
    worker = dep.procs["worker"]
    family = descendants(worker.pid)
    assert job_processes(worker.pid), "no job process to kill"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert not wait_gone(family, 5), f"orphans outlived the killed worker: {alive(family)}"


# -- a worker dies, or is stopped ------------------------------------------------------------------


def test_sigkilled_worker_job_completes_once_and_a_cancelled_queued_job_never_starts(
    dep: Deployment, tmp_path: Path
) -> None:
    with dep.client() as http:
        model_id = upload_model(http, tmp_path)
        job_id = create_job(http, model_id, LONG)
        wait_job(http, job_id, measuring(1), 60, dep)
        kill_worker(dep)

        # While no worker runs: a queued job that is cancelled never starts.
        queued_id = create_job(http, model_id, SHORT)
        cancelled = http.post(f"/v1/jobs/{queued_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text

        dep.start("worker", WORKER)
        job = wait_job(http, job_id, ended, 60, dep)
        assert_one_clean_success(http, dep, job, attempts=2)
        assert attempts_started(dep, job_id) == [1, 2]
        assert not (dep.data_dir / "work" / job_id).exists()  # the killed attempt's scratch too

        wait_log(dep, f"job {queued_id} is not queued")  # its message was delivered, and skipped
        never = http.get(f"/v1/jobs/{queued_id}").json()
        assert never["status"] == "cancelled" and never["attempts"] == 0 and never["started_at"] is None
        assert attempts_started(dep, queued_id) == []


def test_sigterm_hands_a_long_job_back_and_the_next_worker_finishes_it(dep: Deployment, tmp_path: Path) -> None:
    with dep.client() as http:
        job_id = create_job(http, upload_model(http, tmp_path), LONG)
        wait_job(http, job_id, measuring(1), 60, dep)
        worker = dep.procs["worker"]
        family = descendants(worker.pid)
        stopping = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        assert time.monotonic() - stopping < 8  # the grace (1 s) and the hand-back, not the whole job
        assert not wait_gone(family, 3)
        handed_back = http.get(f"/v1/jobs/{job_id}").json()
        assert handed_back["status"] == "queued" and handed_back["attempts"] == 0, handed_back

        dep.start("worker", WORKER)
        job = wait_job(http, job_id, ended, 60, dep)
        assert_one_clean_success(http, dep, job, attempts=1)  # a stop on purpose is not a lost attempt
        assert attempts_started(dep, job_id) == [1, 1]


def test_sigterm_on_the_embedded_default_takes_no_new_task_while_it_stops(tmp_path: Path) -> None:
    """On kombu's filesystem transport the stopping worker went on consuming: it received the job it
    had just handed back, started it again and was stopped 15 s later in the middle of it."""
    for dep in deploy("embedded", tmp_path / "deployment", **FAST):
        with dep.client() as http:
            job_id = create_job(http, upload_model(http, tmp_path), LONG)
            wait_job(http, job_id, measuring(1), 60, dep)
            worker = dep.procs["worker"]
            family = descendants(worker.pid)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
            assert not wait_gone(family, 3)
            handed_back = http.get(f"/v1/jobs/{job_id}").json()
            assert handed_back["status"] == "queued" and handed_back["attempts"] == 0, handed_back
            assert attempts_started(dep, job_id) == [1], worker_log(dep)[-3000:]
            wait_log(dep, rf"job {job_id}: attempt 1 stopped on request and handed back")


def test_embedded_worker_killed_at_every_attempt_fails_with_worker_lost(tmp_path: Path) -> None:
    """The filesystem transport never redelivers the message of a SIGKILLed worker: the sweep must."""
    for dep in deploy("embedded", tmp_path / "deployment", **{**FAST, "QAAS_JOB_MAX_ATTEMPTS": "2"}):
        with dep.client() as http:
            job_id = create_job(http, upload_model(http, tmp_path), LONG)
            for attempt in (1, 2):
                wait_job(http, job_id, measuring(attempt), 60, dep)
                kill_worker(dep)
                dep.start("worker", WORKER)
            job = wait_job(http, job_id, ended, 60, dep)
            assert job["status"] == "failed" and job["attempts"] == 2, job
            assert job["error"]["code"] == "worker_lost", job["error"]
            assert http.get(f"/v1/jobs/{job_id}/artifacts").json() == []
            assert stored_attempts(dep, job_id) == []
            deadline = time.monotonic() + 5  # the sweep clears what the killed attempts left behind
            while scratch(dep, job_id) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert scratch(dep, job_id) == []
            assert attempts_started(dep, job_id) == [1, 2]
            assert_one_job_per_key(dep, tmp_path)  # on SQLite too


# -- the same message twice; cancelling a running job ----------------------------------------------


def test_the_same_message_delivered_twice_runs_once(dep: Deployment, tmp_path: Path) -> None:
    with dep.client() as http:
        job_id = create_job(http, upload_model(http, tmp_path), LONG)
        send_again(dep, job_id, times=2)  # for the second job slot, while the first runs it
        job = wait_job(http, job_id, ended, 60, dep)
        assert_one_clean_success(http, dep, job, attempts=1)
        assert attempts_started(dep, job_id) == [1]
        wait_log(dep, f"job {job_id} is not queued", times=2)  # both copies were delivered, and skipped


def test_cancelling_a_running_job_stops_its_process_and_leaves_nothing(dep: Deployment, tmp_path: Path) -> None:
    with dep.client() as http:
        job_id = create_job(http, upload_model(http, tmp_path), LONG)
        wait_job(http, job_id, measuring(1), 60, dep)
        [child] = [p for p in job_processes(dep.procs["worker"].pid) if job_id in " ".join(p.cmdline())]
        asked = time.monotonic()
        answer = http.post(f"/v1/jobs/{job_id}/cancel")
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] in ("running", "cancelled")
        job = wait_job(http, job_id, ended, 10, dep)
        assert not wait_gone([child], 1), "the job's process outlived its cancellation"
        assert time.monotonic() - asked < 5
        assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled", job
        assert http.get(f"/v1/jobs/{job_id}/artifacts").json() == []
        assert stored_attempts(dep, job_id) == []
        assert not (dep.data_dir / "work" / job_id).exists()
        again = http.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


# -- the broker and the database go away -----------------------------------------------------------


def test_redis_crash_with_jobs_queued_and_running_all_finish(
    tmp_path: Path, database_url: str, redis_server: PrivateRedis
) -> None:
    # QAAS_QUEUED_RESEND_S is 600 s: what delivers the lost messages in time is the worker re-sending
    # every queued job once its broker connection is back, and the hand-back of the running one.
    for dep in production(tmp_path, database_url, redis_server):
        with dep.client() as http:
            model_id = upload_model(http, tmp_path)
            running = create_job(http, model_id, LONG)
            queued = create_job(http, model_id, SHORT)
            wait_job(http, running, measuring(1), 60, dep)

            redis_server.crash()  # no persistence: every message, queued or unacknowledged, is gone
            ready = httpx.get(f"{dep.base_url}/readyz", timeout=30)
            assert ready.status_code == 503 and not ready.json()["checks"]["broker"]["ok"], ready.text
            before = http.get("/v1/jobs").json()["items"]
            refused = http.post("/v1/jobs", json={"model_id": model_id, "recipe": {"mode": "dynamic"}})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "unavailable"
            assert http.get("/v1/jobs").json()["items"] == before  # nothing was created
            redis_server.start()

            for job_id in (running, queued):
                job = wait_job(http, job_id, ended, 60, dep)
                # The running one was handed back when the connection dropped: not a lost attempt.
                assert_one_clean_success(http, dep, job, attempts=1)
            assert httpx.get(f"{dep.base_url}/readyz", timeout=30).status_code == 200
            assert create_job(http, model_id, SHORT)  # the API's broker connection recovered by itself


def test_postgres_outage_during_a_job_the_job_finishes_and_the_api_recovers(
    tmp_path: Path, database_url: str, redis_server: PrivateRedis
) -> None:
    url = make_url(database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        # A lease longer than the outage: the worker rides it out instead of giving the job up.
        slow = {"QAAS_JOB_LEASE_S": "10", "QAAS_EVALUATION_MAX_SECONDS": "6", "QAAS_WORKER_CONCURRENCY": "2"}
        for dep in production(tmp_path, proxied, redis_server, **slow):
            with dep.client() as http:
                model_id = upload_model(http, tmp_path)
                job_id = create_job(http, model_id, LONG)
                wait_job(http, job_id, measuring(1), 60, dep)

                proxy.cut()
                cut = time.monotonic()
                down = http.get(f"/v1/jobs/{job_id}")
                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == "unavailable" and down.json()["error"]["message"]
                ready = httpx.get(f"{dep.base_url}/readyz", timeout=30)
                assert ready.status_code == 503, ready.text
                checks = ready.json()["checks"]
                assert not checks["database"]["ok"] and checks["broker"]["ok"] and checks["storage"]["ok"]
                refused = http.post("/v1/jobs", json={"model_id": model_id, "recipe": {"mode": "dynamic"}})
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "unavailable"
                assert http.get("/v1/models").status_code == 503
                # A message the free job slot receives now cannot be claimed: retried, not dropped.
                send_again(dep, job_id, times=1)
                wait_log(dep, f"job {job_id} could not be claimed")
                time.sleep(max(0.0, 3 - (time.monotonic() - cut)))
                proxy.restore()

                deadline = time.monotonic() + 20
                while httpx.get(f"{dep.base_url}/readyz", timeout=30).status_code != 200:
                    assert time.monotonic() < deadline, "the API did not recover from the outage by itself"
                    time.sleep(0.2)
                job = wait_job(http, job_id, ended, 60, dep)
                assert_one_clean_success(http, dep, job, attempts=1)  # rode out the outage
                assert re.search(rf"job {job_id}: database back after", worker_log(dep))
                wait_log(dep, f"job {job_id} is not queued")  # the retried message, once it could look
                after = wait_job(http, create_job(http, model_id, SHORT), ended, 60, dep)
                assert after["status"] == "succeeded"
    finally:
        proxy.close()


def assert_one_job_per_key(dep: Deployment, tmp_path: Path) -> None:
    """A client that times out and retries while its first request still runs must not get two
    jobs: eight requests with one Idempotency-Key at once make one."""
    with dep.client() as http:
        model_id = upload_model(http, tmp_path)
    body = {"model_id": model_id, "recipe": {"mode": "dynamic"}, "evaluation": SHORT}
    key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=dep.base_url, timeout=60) as client:
            return client.post("/v1/jobs", json=body, headers=key)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1


def test_one_idempotency_key_sent_at_once_by_many_clients_makes_one_job(dep: Deployment, tmp_path: Path) -> None:
    assert_one_job_per_key(dep, tmp_path)


def test_unwritable_storage_answers_503_and_readiness_recovers(dep: Deployment, tmp_path: Path) -> None:
    """The storage's write area stops taking files: a plain file stands where its temporary folder was,
    so every write fails, even root's, on any filesystem and with no tool to install (`chattr +i`
    needs both). That is the service's view of a volume that refuses writes. Uploads answer 503
    (not 500), /readyz names the storage, and both recover once the folder is back."""
    area = dep.data_dir / "storage" / ".tmp"  # where every stored file is written first
    aside = area.with_name(".tmp-aside")
    model = matmul_mlp(tmp_path / "mlp.onnx").read_bytes()
    area.rename(aside)
    area.write_bytes(b"")
    try:
        ready = httpx.get(f"{dep.base_url}/readyz", timeout=30)
        assert ready.status_code == 503 and not ready.json()["checks"]["storage"]["ok"], ready.text
        with dep.client() as http:
            refused = http.post("/v1/models", files={"file": ("mlp.onnx", model)})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
    finally:
        area.unlink()
        aside.rename(area)
    assert httpx.get(f"{dep.base_url}/readyz", timeout=30).status_code == 200
    with dep.client() as http:
        assert http.post("/v1/models", files={"file": ("mlp.onnx", model)}).status_code == 201
