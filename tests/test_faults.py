"""Nothing lost: faults injected for real against a real worker, Redis and S3.

Workers are killed with SIGKILL (or kill themselves through ``tests.support.poison``, a
test-only module the worker imports: image keys with ``slow-``, ``kill-`` or ``torn-``
misbehave once the job is ``running``), stopped with SIGTERM, and Redis and S3 are
stopped and started again on the same ports and data. Each test starts the workers it
needs, so a fault meant for one kind of pool never lands on another.

The stack runs with short limits so redelivery is quick: a visibility timeout of 8 s
(kombu restores a dead worker's unacknowledged message once it is that old), a hard time
limit below it and a soft one below that.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import kombu.pools
import pytest
import redis
from PIL import Image

from config.contract import JobState, JobStatus, output_key
from config.errors import InvalidTransition, JobFailed, QueueUnavailable
from tests.support.images import encode, noise_rgb
from tests.support.services import INPUT_BUCKET
from tests.support.stack import Stack, make_stack
from api_client.dev.processes import WorkerProcess
from worker.pipelines import Pipelines

VISIBILITY_S = 8
MAX_DELIVERIES = 3
SETTINGS = dict(
    visibility_timeout_s=VISIBILITY_S, time_limit_s=VISIBILITY_S - 2, soft_time_limit_s=VISIBILITY_S - 3,
    max_deliveries=MAX_DELIVERIES,
)
MISSING_BUCKET = "segq-no-such-bucket"  # allowed as an input, never created
POISON = ["tests.support.poison"]
IMAGE = encode(Image.fromarray(noise_rgb(96, 64, seed=7)), "PNG")
PROMPT = {"point": [40, 30]}
OUTPUTS = ("cutout.png", "mask.png")  # a cutout job's outputs, besides its manifest
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory, module_monkeypatch) -> Iterator[Stack]:
    s = make_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path_factory.mktemp("logs"),
                   module_monkeypatch, **SETTINGS,
                   allowed_inputs=["s3://segq-input/", f"s3://{MISSING_BUCKET}/"])  # fmt: skip
    yield s
    s.stop_workers()


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator["Workers"]:
    w = Workers(stack, tmp_path / "poison.log")
    yield w
    stack.stop_workers()


class Workers:
    """Starts this test's workers (in parallel) and reads what the poison module did."""

    def __init__(self, stack: Stack, poison_log: Path) -> None:
        self.stack = stack
        self.poison_log = poison_log

    def start(self, count: int = 1, *, poison: bool = False, slow_s: float = 3, **kwargs) -> list[WorkerProcess]:
        env = {"POISON_LOG": str(self.poison_log), "POISON_SLOW_S": str(slow_s)}
        started = []
        for _ in range(count):
            w = self.stack.worker(imports=POISON if poison else (), **kwargs)
            w.env.update(env)
            started.append(w.start(wait=False))
        for w in started:
            w.wait_ready()
        return started

    def kills(self) -> list[str]:
        return self.poison_log.read_text().splitlines() if self.poison_log.exists() else []


def wait_for(predicate: Callable[[], T], timeout: float, what: str, poll: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def output(stack: Stack, job_id: str, name: str) -> str:
    return output_key(stack.settings.output_prefix, job_id, name)


def assert_outputs_whole(stack: Stack, job, status: JobStatus) -> None:
    """The manifest and every output exist, decode, and equal what the in-process
    pipeline makes from the same input: no object is missing, partial or stale."""
    expected = Pipelines(stack.settings).cutout(IMAGE, PROMPT)
    manifest = json.loads(job.output("manifest.json"))
    assert manifest["job_id"] == job.id and manifest["result"]["outputs"] == status.result["outputs"]
    assert set(status.result["outputs"]) == set(expected.files) == set(OUTPUTS)
    for name, (data, _) in expected.files.items():
        stored = job.output(name)
        assert stored == data, f"{name} differs from the in-process pipeline"
        Image.open(io.BytesIO(stored)).load()


# --- 1. a worker killed mid-job ---------------------------------------------------------


def test_threads_worker_killed_mid_upload_job_runs_again_elsewhere_whole(stack: Stack, workers: Workers) -> None:
    """SIGKILL of a whole threads-pool worker after it wrote one output and before the
    manifest: the message stays unacknowledged in Redis until the dead worker's heartbeat
    expires, then the survivor's recovery sweep puts it back on the queue and the job runs
    again there, overwriting its own outputs."""
    first, second = workers.start(2, poison=True)
    uri = stack.upload(IMAGE, "torn-threads.png")
    job = stack.client.cutout(uri, PROMPT)
    t0 = time.monotonic()

    dead = wait_for(lambda: [w for w in (first, second) if w.proc.poll() is not None], 20, "a worker to die")
    killed_at = time.monotonic()
    assert len(dead) == 1 and dead[0].proc.returncode == -9
    survivor = second if dead[0] is first else first
    torn = job.status()
    assert torn.state is JobState.running and torn.attempts == 1 and torn.worker == dead[0].hostname
    exists = stack.client.storage.exists
    written = [name for name in OUTPUTS if exists(output(stack, job.id, name))]
    assert len(written) == 1 and not exists(output(stack, job.id, "manifest.json"))  # torn

    # the survivor goes on serving while the lost job waits for the dead worker to expire
    other = stack.client.cutout(stack.upload(IMAGE, "plain.png"), PROMPT).wait(timeout=10)
    assert other.worker == survivor.hostname and job.status().state is JobState.running

    st = job.wait(timeout=VISIBILITY_S + 20)
    recovered = time.monotonic() - killed_at
    print(f"threads kill: redelivered and done {recovered:.1f}s after the kill, {time.monotonic() - t0:.1f}s after submit")
    assert st.attempts == 2 and st.worker == survivor.hostname
    assert [line.split()[:2] for line in workers.kills()] == [["torn", job.id]]
    assert_outputs_whole(stack, job, st)


def test_prefork_child_killed_mid_upload_job_is_requeued_at_once_and_whole(stack: Stack, workers: Workers) -> None:
    """Under prefork only the pool child dies: Celery sees WorkerLostError and, with
    ``task_reject_on_worker_lost``, puts the message back at once (no visibility wait);
    the job runs again on a fresh child of the same worker."""
    (worker,) = workers.start(poison=True, pool="prefork", concurrency=1)
    job = stack.client.cutout(stack.upload(IMAGE, "torn-prefork.png"), PROMPT)
    t0 = time.monotonic()
    st = job.wait(timeout=30)
    print(f"prefork child kill: done after {time.monotonic() - t0:.1f}s")
    assert [line.split()[:2] for line in workers.kills()] == [["torn", job.id]]
    assert st.attempts == 2 and st.worker == worker.hostname and worker.proc.poll() is None
    assert_outputs_whole(stack, job, st)


# --- 2. a poison job --------------------------------------------------------------------


def test_poison_job_ends_worker_lost_after_max_deliveries_and_others_succeed(stack: Stack, workers: Workers) -> None:
    """A job that kills its pool child on every delivery is run ``max_deliveries`` times;
    the next delivery ends it ``failed``/``worker_lost`` without running it, instead of
    killing children for ever. Jobs beside it succeed and the worker lives on."""
    (worker,) = workers.start(poison=True, pool="prefork", concurrency=2)
    poison = stack.client.cutout(stack.upload(IMAGE, "kill-always.png"), PROMPT)
    good_uri = stack.upload(IMAGE, "good.png")
    good = [stack.client.cutout(good_uri, PROMPT) for _ in range(4)]
    with pytest.raises(JobFailed) as info:
        poison.wait(timeout=60)
    assert info.value.job_code == "worker_lost"
    st = poison.status()
    assert st.attempts == MAX_DELIVERIES + 1  # the last delivery only records the verdict
    assert [line.split()[:2] for line in workers.kills()] == [["kill", poison.id]] * MAX_DELIVERIES
    assert all(job.wait(timeout=30).state is JobState.succeeded for job in good)
    assert worker.proc.poll() is None


# --- 3. Redis restarts --------------------------------------------------------------------


def test_redis_crash_and_restart_loses_no_queued_job_or_status(stack: Stack, workers: Workers, redis_server) -> None:
    """Redis is SIGKILLed (no chance to save: only its AOF, fsynced on every write, keeps
    the data) and started again on the same port. Meanwhile a submit fails with a clear
    ``queue_unavailable``; afterwards the same client and the same worker carry on by
    themselves, the jobs queued before the crash run, and every status is still there."""
    (worker,) = workers.start()
    client = stack.client  # one client across the restart: it must reconnect by itself
    control = client.celery.control
    uri = stack.upload(IMAGE, "redis.png")
    done = client.cutout(uri, PROMPT).wait(timeout=20)
    batch = stack.settings.queue_batch
    control.cancel_consumer(batch, destination=[worker.hostname], reply=True, timeout=5)
    queued = [client.panoptic(uri) for _ in range(2)]
    assert {job.status().state for job in queued} == {JobState.queued}

    os.kill(redis_server.pid, signal.SIGKILL)
    try:
        redis_server.stop()  # reaps it
        t0 = time.monotonic()
        with pytest.raises(QueueUnavailable) as info:
            client.cutout(uri, PROMPT)
        print(f"redis down: submit refused after {time.monotonic() - t0:.1f}s: {info.value}")
    finally:
        redis_server.start()
    restarted = time.monotonic()
    try:
        assert client.status(done.job_id) == done
        assert {job.status().state for job in queued} == {JobState.queued}
        # The worker's consumer reconnects on its own; only then does it hear the command.
        wait_for(lambda: control_reply(stack, "add_consumer", batch, worker.hostname), 30, "the worker to reconnect")
        for job in queued:
            st = job.wait(timeout=30)
            assert st.attempts == 1 and st.worker == worker.hostname
        after = client.cutout(uri, PROMPT).wait(timeout=30)
        assert after.worker == worker.hostname and worker.proc.poll() is None
        print(f"redis restart: queued jobs and a new one done {time.monotonic() - restarted:.1f}s after the restart")
    finally:
        # kombu's process-wide pool still holds connections whose sockets Redis dropped;
        # control replies on them are never seen, so later tests start from fresh ones.
        kombu.pools.reset()


def control_reply(stack: Stack, command: str, queue: str, hostname: str) -> list:
    """A control command with its reply over a connection of its own (see ``kombu.pools``
    above)."""
    app = stack.client.celery
    with app.connection_for_write() as connection:
        send = getattr(app.control, command)
        return send(queue, destination=[hostname], reply=True, timeout=1, connection=connection)


# --- 4. S3 outages --------------------------------------------------------------------------


@pytest.fixture
def patient_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch) -> Iterator[Stack]:
    """A stack with a long visibility timeout and short S3 timeouts: just after a restart
    the S3 server can hold a request for seconds, and a worker stuck in one must not see
    the retries it holds (ETA messages) restored to the queue and delivered twice."""
    limits = dict(visibility_timeout_s=60, time_limit_s=50, soft_time_limit_s=45)
    s = make_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch, **{**SETTINGS, **limits})
    s.settings = s.settings.model_copy(update={"s3_read_timeout_s": 3.0})
    yield s
    s.stop_workers()


def test_s3_outage_is_retried_with_backoff_until_s3_returns(patient_stack: Stack, s3_server, tmp_path) -> None:
    """S3 is stopped for about 10 s while jobs arrive: each delivery fails with
    ``storage_unavailable``, goes back to ``queued`` with a ``retrying: ...`` stage and is
    tried again after a jittered, growing delay; once S3 is back every job succeeds."""
    stack = patient_stack
    Workers(stack, tmp_path / "poison.log").start()
    client = stack.client
    uri = stack.upload(IMAGE, "s3-outage.png")
    s3_server.stop()
    try:
        t0 = time.monotonic()
        jobs = [client.cutout(uri, PROMPT) for _ in range(3)]
        stages: dict[str, set] = {job.id: set() for job in jobs}
        while time.monotonic() - t0 < 10:
            for job in jobs:
                stages[job.id].add(job.status().stage)
            time.sleep(0.1)
        during = [job.status() for job in jobs]
    finally:
        s3_server.start()
    back = time.monotonic()
    assert not any(st.is_final for st in during)
    for job in jobs:
        st = job.wait(timeout=30, on_update=lambda s: stages[s.job_id].add(s.stage))
        assert st.attempts > 1
        assert any(stage and stage.startswith("retrying: storage_unavailable") for stage in stages[job.id])
        assert_outputs_whole(stack, job, st)
    print(f"s3 outage: S3 back after {back - t0:.1f}s, jobs done {time.monotonic() - back:.1f}s later; "
          f"attempts during the outage {[st.attempts for st in during]}")  # fmt: skip


def test_permanent_s3_faults_fail_at_once_with_their_code(
    stack: Stack, workers: Workers, redis_server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch
) -> None:
    """A missing object or bucket, or a worker whose S3 secret is wrong, is no outage:
    the job fails on its first attempt with its own code instead of retrying."""
    denied = make_stack(redis_server, s3_server, sam2_repo, detr_repo, tmp_path, monkeypatch, **SETTINGS)
    wrong_secret = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    denied_worker = WorkerProcess(denied.settings, tmp_path, extra_env=wrong_secret, name="denied")
    denied.workers.append(denied_worker)
    try:
        denied_worker.start(wait=False)
        workers.start()
        denied_worker.wait_ready()
        jobs = {
            "object_not_found": stack.client.cutout(f"s3://{INPUT_BUCKET}/no/such/image.png", PROMPT),
            "bucket_not_found": stack.client.cutout(f"s3://{MISSING_BUCKET}/image.png", PROMPT),
            "access_denied": denied.client.cutout(denied.upload(IMAGE, "denied.png"), PROMPT),
        }
        for code, job in jobs.items():
            with pytest.raises(JobFailed) as info:
                job.wait(timeout=20)
            assert info.value.job_code == code
            assert job.status().attempts == 1
    finally:
        denied.stop_workers()


# --- 5. graceful shutdown -------------------------------------------------------------------


def test_sigterm_finishes_the_running_job_and_leaves_queued_jobs_for_the_next_worker(
    stack: Stack, workers: Workers
) -> None:
    """SIGTERM while a slow job runs: Celery's warm shutdown lets it finish and acknowledge
    before the process exits, takes nothing new, and the jobs behind it stay on the queue
    (none held unacknowledged by the dead worker) until the next worker runs them."""
    (first,) = workers.start(poison=True, concurrency=1, slow_s=3)
    client = stack.client
    slow = client.cutout(stack.upload(IMAGE, "slow-shutdown.png"), PROMPT)
    wait_for(lambda: slow.status().state is JobState.running, 10, "the slow job to start")
    uri = stack.upload(IMAGE, "behind.png")
    behind = [client.cutout(uri, PROMPT) for _ in range(3)]

    assert first.terminate(timeout=30) == 0
    st = slow.status()
    assert st.state is JobState.succeeded and st.attempts == 1 and st.worker == first.hostname
    assert [job.status().attempts for job in behind] == [0, 0, 0]
    broker = redis.Redis.from_url(stack.settings.broker)
    assert broker.hlen("unacked") == 0 and broker.llen(stack.settings.queue_interactive) == len(behind)

    (second,) = workers.start()
    for job in behind:
        st = job.wait(timeout=20)
        assert st.attempts == 1 and st.worker == second.hostname


# --- 6. cancellation ------------------------------------------------------------------------


def test_cancel_racing_the_worker_exactly_one_wins(stack: Stack, workers: Workers) -> None:
    """Cancels sent right after submits race the worker picking the jobs up. The status
    store's transitions let exactly one side win each race: a cancelled job never starts
    (no attempt, no outputs), and a cancel that comes too late is refused and the job
    succeeds."""
    workers.start()
    client = stack.client
    uri = stack.upload(IMAGE, "race.png")
    rng = random.Random(6)
    won: dict[str, bool] = {}
    for _ in range(30):
        job = client.cutout(uri, PROMPT)
        time.sleep(rng.choice([0, rng.uniform(0, 0.03)]))
        try:
            won[job.id] = job.cancel().state is JobState.cancelled
        except InvalidTransition:
            won[job.id] = False
    for job_id, cancelled in won.items():
        if not cancelled:
            assert client.wait(job_id, timeout=20).attempts == 1
    broker = redis.Redis.from_url(stack.settings.broker)
    wait_for(lambda: not broker.llen(stack.settings.queue_interactive) and not broker.hlen("unacked"), 20,
             "the worker to have received and settled every message")  # fmt: skip
    for job_id, cancelled in won.items():
        if cancelled:
            st = client.status(job_id)
            assert st.state is JobState.cancelled and st.attempts == 0 and st.started_at is None
            assert not any(client.storage.exists(output(stack, job_id, name)) for name in OUTPUTS)
    print(f"cancel race: {sum(won.values())} cancels won, {len(won) - sum(won.values())} came too late")


# --- 7. time limits under the threads pool ----------------------------------------------------


def test_threads_pool_job_over_its_time_limit_fails_with_timeout(stack: Stack, workers: Workers) -> None:
    """Celery enforces time limits only in the prefork pool; under threads a job over its
    soft limit still ends ``failed``/``timeout`` at its next stage, and the worker goes on."""
    worker_limit = 1
    worker = stack.worker(imports=POISON, concurrency=1)
    worker.env.update(POISON_SLOW_S="2.5", SEGQ_SOFT_TIME_LIMIT_S=str(worker_limit))
    worker.start()
    client = stack.client
    slow = client.cutout(stack.upload(IMAGE, "slow-overtime.png"), PROMPT)
    with pytest.raises(JobFailed) as info:
        slow.wait(timeout=30)
    assert info.value.job_code == "timeout" and f"{worker_limit}s" in info.value.message
    assert client.cutout(stack.upload(IMAGE, "quick.png"), PROMPT).wait(timeout=30).state is JobState.succeeded
