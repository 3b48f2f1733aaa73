"""The batch scheduler's wake-ups, in process and without TensorFlow: a request that arrives
while a merged run is in flight wakes no batch thread, yet no request is ever left behind
(held requests share the next run, full batches start at once, timeouts still fire)."""

import threading
import time

import numpy as np
import pytest

from tfweave.serving.batching import MergedBatchQueue, ModelBatchQueue, SharedBatchScheduler, Task


class _Metrics:
    def __init__(self):
        self.batches = []

    def observe_batch(self, model, requests, members, seconds=0.0):
        self.batches.append((model, requests, members))


class _FakeMerged:
    """run_members answers member i's rows with ``x * (i + 1)``; the first ``hold`` runs wait
    for ``release`` so a test can submit while they are in flight."""

    def __init__(self, num_members, hold=0):
        self.num_members = num_members
        self.member_names = [f"m{i}" for i in range(num_members)]
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.runs: list[list[int]] = []     # requests per member, per run
        self._hold = hold
        self._lock = threading.Lock()

    def run_members(self, per_member):
        with self._lock:
            self.runs.append([len(tasks) for tasks in per_member])
            held = len(self.runs) <= self._hold
        self.started.release()
        if held:
            assert self.release.wait(10), "the test never released the run"
        return [{"y": np.concatenate([t.inputs["x"] for t in tasks]) * (i + 1)} if tasks else {}
                for i, tasks in enumerate(per_member)]


def _task(value, member=0, rows=1):
    return Task({"x": np.full((rows, 2), value, np.float32)}, rows, ("y",), member=member)


@pytest.fixture
def scheduler():
    scheduler = SharedBatchScheduler(2, _Metrics())
    yield scheduler
    scheduler.stop()


def _merged_queue(scheduler, merged, *, max_batch_size=8, timeout_s=0.0):
    return scheduler.add_queue(MergedBatchQueue(
        scheduler, "merged", merged, max_batch_size=max_batch_size, timeout_s=timeout_s,
        max_enqueued_batches=4, batching=True))


def test_requests_arriving_during_a_merged_run_share_the_next_run(scheduler):
    merged = _FakeMerged(4, hold=1)
    queue = _merged_queue(scheduler, merged)
    first = queue.submit(_task(1.0, member=0))
    assert merged.started.acquire(timeout=10)
    later = [queue.submit(_task(float(v), member=v % 4)) for v in range(2, 10)]
    merged.release.set()
    assert first.result(10)["y"].tolist() == [[1.0, 1.0]]
    for v, future in zip(range(2, 10), later):
        assert future.result(10)["y"].tolist() == [[v * (v % 4 + 1)] * 2]
    assert merged.runs == [[1, 0, 0, 0], [2, 2, 2, 2]]


def test_a_full_member_batch_starts_a_second_run_while_one_is_in_flight(scheduler):
    merged = _FakeMerged(2, hold=1)
    queue = _merged_queue(scheduler, merged, max_batch_size=2)
    first = queue.submit(_task(1.0, member=1))
    assert merged.started.acquire(timeout=10)
    full = [queue.submit(_task(2.0, member=0)), queue.submit(_task(3.0, member=0))]
    # The second run starts although the first is still held: a full batch does not wait.
    assert merged.started.acquire(timeout=10)
    assert [f.result(10)["y"].tolist() for f in full] == [[[2.0, 2.0]], [[3.0, 3.0]]]
    assert not first.done()
    merged.release.set()
    assert first.result(10)["y"].tolist() == [[2.0, 2.0]]


def test_a_lone_merged_request_runs_when_its_batch_timeout_expires(scheduler):
    merged = _FakeMerged(3)
    queue = _merged_queue(scheduler, merged, timeout_s=0.05)
    assert queue.submit(_task(4.0, member=2)).result(10)["y"].tolist() == [[12.0, 12.0]]


def test_a_batch_timeout_of_centuries_holds_partial_batches_yet_runs_full_ones(scheduler):
    """batch_timeout_micros is any int64 in TF Serving; one beyond what a thread can wait
    (threading.TIMEOUT_MAX) must not kill the batch threads and leave every request hanging."""
    merged = _FakeMerged(2)
    queue = _merged_queue(scheduler, merged, max_batch_size=2, timeout_s=1e16 / 1e6)
    lone = queue.submit(_task(1.0, member=0))
    time.sleep(0.2)   # both batch threads look at the partial batch and wait
    assert not lone.done()
    full = [queue.submit(_task(2.0, member=1)), queue.submit(_task(3.0, member=1))]
    assert [f.result(10)["y"].tolist() for f in full] == [[[4.0, 4.0]], [[6.0, 6.0]]]
    assert all(thread.is_alive() for thread in scheduler._threads)


@pytest.mark.parametrize("timeout_s", [0.0, 0.002])
def test_concurrent_submitters_lose_no_request(scheduler, timeout_s):
    merged = _FakeMerged(8)
    merged_queue = _merged_queue(scheduler, merged, timeout_s=timeout_s)
    plain = scheduler.add_queue(ModelBatchQueue(
        scheduler, "plain", lambda feeds, keys: {"y": feeds["x"] * 10}, max_batch_size=4,
        timeout_s=timeout_s, max_enqueued_batches=1000, batching=True, output_keys=("y",)))
    results = {}

    def client(c):
        for k in range(40):
            value = float(c * 100 + k)
            if c % 2:
                got = merged_queue.submit(_task(value, member=c % 8)).result(10)["y"]
                results[(c, k)] = (got, value * (c % 8 + 1))
            else:
                got = plain.submit(_task(value)).result(10)["y"]
                results[(c, k)] = (got, value * 10)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 12 * 40
    for got, expected in results.values():
        assert got.tolist() == [[expected, expected]]


def test_a_queue_allowed_two_runs_in_flight_starts_a_second_without_a_full_batch(scheduler):
    merged = _FakeMerged(2, hold=1)
    queue = scheduler.add_queue(MergedBatchQueue(
        scheduler, "merged", merged, max_batch_size=8, timeout_s=0.0, max_enqueued_batches=4,
        batching=True, max_in_flight=2))
    first = queue.submit(_task(1.0, member=0))
    assert merged.started.acquire(timeout=10)
    second = queue.submit(_task(2.0, member=1))
    assert second.result(10)["y"].tolist() == [[4.0, 4.0]]   # ran beside the held first run
    merged.release.set()
    assert first.result(10)["y"].tolist() == [[1.0, 1.0]]
    assert merged.runs == [[1, 0], [0, 1]]


def test_the_next_merged_run_starts_while_the_last_runs_answers_are_handed_out(scheduler):
    merged = _FakeMerged(2)
    queue = _merged_queue(scheduler, merged)
    handing_out, second_started = threading.Event(), threading.Event()
    first = queue.submit(_task(1.0, member=0))

    def slow_hand_out(_):
        # Runs in the batch thread while it delivers the first run's answers.
        handing_out.set()
        second_started.wait(10)

    first.add_done_callback(slow_hand_out)
    assert handing_out.wait(10)
    second = queue.submit(_task(2.0, member=1))
    assert merged.started.acquire(timeout=10) and merged.started.acquire(timeout=10)
    second_started.set()   # the second run got a thread while the first was still answering
    assert second.result(10)["y"].tolist() == [[4.0, 4.0]]
    assert first.result(10)["y"].tolist() == [[1.0, 1.0]]
    assert merged.runs == [[1, 0], [0, 1]]


def test_runs_in_the_batch_thread_equal_runs_on_the_inter_op_pool(tmp_path):
    import tensorflow as tf

    from tfweave.serving.backends import SessionModel

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x):
            w = tf.constant([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]])
            return {"y": tf.nn.relu(tf.matmul(x, w)), "z": tf.reduce_sum(x, axis=1)}

    module = Net()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve})
    in_caller = SessionModel(str(tmp_path / "1"), tf.compat.v1.ConfigProto(),
                             run_in_caller_thread=True)
    pooled = SessionModel(str(tmp_path / "1"), tf.compat.v1.ConfigProto())
    try:
        x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
        expected = module.serve(tf.constant(x))
        for model in (in_caller, pooled):
            got = model.run("serving_default", {"x": x}, ("y", "z"))
            np.testing.assert_allclose(got["y"], expected["y"].numpy(), rtol=1e-6)
            np.testing.assert_allclose(got["z"], expected["z"].numpy(), rtol=1e-6)
    finally:
        in_caller.close()
        pooled.close()


def test_sessions_pinned_to_one_intra_op_thread_allow_a_merged_run_per_core_but_one(tmp_path):
    import os

    import tensorflow as tf

    from tfweave.serving.backends import SessionModel

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * 2}

    module = Doubler()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve})
    pinned = SessionModel(str(tmp_path / "1"), tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=1))
    default = SessionModel(str(tmp_path / "1"), tf.compat.v1.ConfigProto())
    try:
        assert pinned.concurrent_runs == max(1, (os.cpu_count() or 1) - 1)
        assert default.concurrent_runs == 1
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        assert pinned.run("serving_default", {"x": x}, ("y",))["y"].tolist() == (x * 2).tolist()
    finally:
        pinned.close()
        default.close()


def test_a_retired_queue_answers_what_it_holds_then_refuses_and_leaves(scheduler):
    from tfweave.serving.batching import Retired

    merged = _FakeMerged(2, hold=1)
    queue = _merged_queue(scheduler, merged)
    first = queue.submit(_task(1.0, member=0))
    assert merged.started.acquire(timeout=10)          # its run is in flight, held
    queued = [queue.submit(_task(2.0, member=1)), queue.submit(_task(3.0, member=0))]
    retired = threading.Event()
    result = {}

    def retire():
        result["drained"] = scheduler.retire(queue, timeout_s=30)
        retired.set()

    threading.Thread(target=retire, daemon=True).start()
    assert not retired.wait(0.3)                       # it waits for the held run and the rest
    with pytest.raises(Retired):
        queue.submit(_task(4.0, member=1))
    merged.release.set()
    assert retired.wait(10) and result["drained"]
    assert first.result(5)["y"][0, 0] == 1.0
    assert [f.result(5)["y"][0, 0] for f in queued] == [4.0, 3.0]
    assert "merged" not in scheduler.queue_depths()     # removed from the scheduler


def test_retiring_a_queue_that_cannot_drain_fails_its_requests_unavailable(scheduler):
    from tfweave.serving.status import ServingError

    merged = _FakeMerged(1, hold=1)
    queue = _merged_queue(scheduler, merged)
    queue.submit(_task(1.0))
    assert merged.started.acquire(timeout=10)
    stuck = queue.submit(_task(2.0))                   # waits behind the held run
    assert scheduler.retire(queue, timeout_s=0.2) is False
    with pytest.raises(ServingError) as error:
        stuck.result(5)
    assert error.value.code == "UNAVAILABLE"
    merged.release.set()


def test_the_default_intra_op_threads_share_the_cores_among_the_batch_threads(monkeypatch):
    from tfweave.serving import backends
    from tfweave.serving.model_config import BatchingParameters
    from tfweave.serving.server import ModelServer, ServerOptions

    monkeypatch.setattr(backends.os, "cpu_count", lambda: 8)
    assert [backends.default_intra_op_threads(t) for t in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    made = []
    real = backends.make_backend
    monkeypatch.setattr(backends, "make_backend",
                        lambda spec, **kw: made.append(kw) or real(spec, **kw))
    for options in (ServerOptions(entries=[], batching=BatchingParameters(num_batch_threads=2)),
                    ServerOptions(entries=[], batching=BatchingParameters(num_batch_threads=2),
                                  intra_op_threads=3)):
        ModelServer(options).stop()
    assert [kw["intra_op_threads"] for kw in made] == [4, 3]   # the flag, when given, wins
