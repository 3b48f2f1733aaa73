"""KerasTuner's chief/worker mode for stage trees: leases, back-off and a chief that can restart.

KerasTuner's chief serves the oracle over gRPC and workers call only its stock methods, so
everything here rides on them:

- *Waiting for a ready stage.* ``BaseTuner.search`` re-asks at once when the oracle answers
  IDLE (a stage is waiting for its parent). The chief (``serve_chief``) holds such a
  ``create_trial`` until another worker's report makes a stage ready (or a couple of seconds
  pass), so the idle worker starts it at once; ``BackoffOracleClient`` re-asks right after a held
  answer, sleeps with doubling back-off (up to ``max_delay``) after an immediate one (a chief
  that does not hold requests), and retries a call cut by a chief restart.
- *One round trip per stage.* A worker sends a stage's per-epoch metrics inside ``end_trial``'s
  trial instead of one ``update_trial`` per epoch.
- *Leases.* A worker renews the lease on the stage it runs by calling ``get_trial`` for it every
  ``lease_seconds / 4`` (``Heartbeat``). The chief's loop (``serve_chief``) hands a stage whose
  lease ran out to another worker, from the stage's parent checkpoint: a killed worker loses at
  most the stage it was running.
- *Chief restart.* The oracle's state and stage tree are written atomically on every change; a
  restarted chief reloads them, keeps stages that were running under a fresh lease (their workers
  carry on, their gRPC calls wait for the chief to be back) and reruns only those whose lease
  runs out.
"""

from __future__ import annotations

import logging
import os
import threading
import time

LOG = logging.getLogger("tfweave.hippo")


def is_chief() -> bool:
    from keras_tuner.src.distribute import utils as dist_utils
    return dist_utils.is_chief_oracle()


def is_worker() -> bool:
    from keras_tuner.src.distribute import utils as dist_utils
    return dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle()


# gRPC's default reconnect back-off grows from 1 s by 1.6x (with jitter): a worker started
# before its chief, or waiting out a chief restart, would notice the chief seconds late.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50),
                      ("grpc.min_reconnect_backoff_ms", 50),
                      ("grpc.max_reconnect_backoff_ms", 250)]


def _fast_reconnecting_stub():
    import grpc
    from keras_tuner.src import protos

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    channel = grpc.insecure_channel(address, options=_RECONNECT_OPTIONS)
    return protos.get_service_grpc().OracleStub(channel)


class BackoffOracleClient:
    """Wraps KerasTuner's ``OracleClient``: waits with back-off on IDLE, survives chief restarts."""

    _CALLS = ("create_trial", "update_trial", "end_trial", "get_trial", "get_best_trials",
              "get_space", "update_space")

    def __init__(self, client, min_delay: float = 0.05, max_delay: float = 0.5,
                 retry_seconds: float = 600.0):
        self._client = client
        self.min_delay, self.max_delay, self.retry_seconds = min_delay, max_delay, retry_seconds
        self.idle_waits = 0  # how many IDLE answers were waited out (tests read it)
        if hasattr(client, "stub") and os.environ.get("KERASTUNER_ORACLE_IP"):
            client.stub = _fast_reconnecting_stub()

    def __getattr__(self, name):
        if name in self._CALLS:
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        return getattr(self._client, name)

    def _call(self, name, *args, **kwargs):
        import grpc

        deadline = time.monotonic() + self.retry_seconds
        delay = self.min_delay
        while True:
            try:
                return getattr(self._client, name)(*args, **kwargs)
            except grpc.RpcError as error:
                # A call cut mid-flight by a chief restart; new calls wait for it to be back.
                if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.DEADLINE_EXCEEDED) or \
                        time.monotonic() > deadline:
                    raise
                LOG.warning("chief unreachable during %s (%s); retrying in %.1f s", name,
                            error.code().name, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)

    def create_trial(self, tuner_id):
        delay = self.min_delay
        while True:
            asked = time.monotonic()
            trial = self._call("create_trial", tuner_id)
            if trial.status != "IDLE":
                return trial
            # Nothing ready yet (a stage waits for its parent on another worker).
            self.idle_waits += 1
            if time.monotonic() - asked >= self.min_delay:
                # The chief held the request until its wait ran out (``serve_chief`` answers
                # as soon as a stage is ready): ask again at once.
                delay = self.min_delay
                continue
            time.sleep(delay)
            delay = min(delay * 2, self.max_delay)


class Heartbeat:
    """Renews a running stage's lease on the chief until stopped."""

    def __init__(self, client, trial_id: str, interval: float):
        self._client, self._trial_id, self._interval = client, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hippo-heartbeat-{trial_id}",
                                        daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self._interval):
            try:
                self._client.get_trial(self._trial_id)
            except Exception as error:  # the chief may be restarting; the lease tolerates gaps
                LOG.debug("heartbeat for %s failed: %s", self._trial_id, error)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


FINISHED_MARKER = "hippo_chief_finished.json"


def finished_marker(project_dir: str) -> str:
    """Written by the chief when the study is over: a worker that starts later exits at once
    instead of waiting (KerasTuner's client waits up to an hour) for a chief that is gone."""
    return os.path.join(project_dir, FINISHED_MARKER)


class _WakingServicer:
    """KerasTuner's ``OracleServicer`` with one change: a ``CreateTrial`` that finds no stage
    ready waits (up to ``wait_seconds``) for one to become ready, instead of answering IDLE at
    once, so an idle worker starts a stage the moment its parent's report arrives rather than
    after its next back-off pause. Calls are serialised as with KerasTuner's one-thread server;
    a waiting ``CreateTrial`` gives the lock up while it waits. (gRPC only looks the handlers up
    by name, so the other calls are forwarded to KerasTuner's servicer.)"""

    def __init__(self, oracle, wait_seconds: float):
        from keras_tuner.src.distribute import oracle_chief

        self.wait_seconds = wait_seconds
        self.changed = threading.Condition()
        self._stock = oracle_chief.OracleServicer(oracle)

    @property
    def stop_triggered(self) -> bool:
        return self._stock.stop_triggered

    def CreateTrial(self, request, context):
        from keras_tuner.src import protos

        idle = protos.get_proto().TrialStatus.IDLE
        deadline = time.monotonic() + self.wait_seconds
        with self.changed:
            while True:
                response = self._stock.CreateTrial(request, context)
                left = deadline - time.monotonic()
                if response.trial.status != idle or left <= 0 or not context.is_active():
                    return response
                self.changed.wait(left)

    def EndTrial(self, request, context):
        with self.changed:
            response = self._stock.EndTrial(request, context)
            self.changed.notify_all()  # a stage may have become ready, or the study ended
            return response

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._stock, name)

        def serialised(request, context):
            with self.changed:
                return method(request, context)
        return serialised

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def serve_chief(oracle, poll_seconds: float = 0.5, linger_seconds: float = 5.0,
                wait_seconds: float = 2.0) -> None:
    """KerasTuner's chief server, plus lease expiry, ready-stage wake-ups and an exit once the
    study is over.

    Replaces ``keras_tuner.src.distribute.oracle_chief.start_server``, whose loop neither expires
    stages of dead workers nor exits before every worker it ever saw has asked again, and whose
    IDLE answers leave a waiting worker to poll.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    # Threads: one per waiting worker plus one for the calls that end or renew stages.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    servicer = _WakingServicer(oracle, wait_seconds)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if not server.add_insecure_port(address):
        raise RuntimeError(f"the hippo chief cannot listen on {address}: is another chief "
                           f"running there? Set KERASTUNER_ORACLE_PORT to a free port")
    from tfweave.hippo import storage
    marker = finished_marker(oracle._project_dir)
    storage.remove(marker)
    server.start()
    LOG.info("hippo chief serving the oracle on %s", address)
    try:
        while True:
            time.sleep(poll_seconds)
            with servicer.changed:
                if oracle.expire_leases():
                    servicer.changed.notify_all()  # an expired stage is ready again
                if oracle.study_finished(stop_sent=servicer.stop_triggered):
                    break
        storage.atomic_write_json(marker, {"finished": time.time()})
        # Workers that checked the marker just before it appeared still get their STOPPED.
        time.sleep(linger_seconds)
    finally:
        server.stop(grace=1.0)
    LOG.info("hippo chief: study finished")
