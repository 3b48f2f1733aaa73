"""The chief's ``CreateTrial`` waits for a stage to become ready instead of answering IDLE, and
the worker's client asks again at once after such a wait (no polling, no back-off sleep)."""

import threading

import pytest
from keras_tuner.src import protos
from keras_tuner.src.engine import hyperparameters as hp_module
from keras_tuner.src.engine import trial as trial_module

from tfweave.hippo import distributed


class _Oracle:
    """Answers IDLE until ``ready`` is set (by an ``end_trial``), then a running trial."""

    def __init__(self):
        self.ready = False
        self.asked = 0

    def create_trial(self, tuner_id):
        self.asked += 1
        status = trial_module.TrialStatus.RUNNING if self.ready else \
            trial_module.TrialStatus.IDLE
        return trial_module.Trial(hp_module.HyperParameters(), trial_id="0001", status=status)

    def end_trial(self, trial):
        self.ready = True


class _Context:
    def is_active(self):
        return True


def _create(servicer):
    request = protos.get_service().CreateTrialRequest(tuner_id="tuner1")
    return servicer.CreateTrial(request, _Context())


def test_a_waiting_create_trial_is_answered_when_another_workers_report_makes_a_stage_ready():
    oracle = _Oracle()
    servicer = distributed._WakingServicer(oracle, wait_seconds=600)
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(_create(servicer)))
    waiter.start()
    while oracle.asked == 0:  # the waiter found nothing ready and is waiting
        threading.Event().wait(0.01)
    ended = trial_module.Trial(hp_module.HyperParameters(), trial_id="0000",
                               status=trial_module.TrialStatus.COMPLETED)
    servicer.EndTrial(protos.get_service().EndTrialRequest(trial=ended.to_proto()), _Context())
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    (answer,) = answers
    assert answer.trial.status == protos.get_proto().TrialStatus.RUNNING
    assert oracle.asked == 2  # once on arrival, once on the wake-up: no polling in between


def test_a_create_trial_with_nothing_ready_answers_idle_once_its_wait_runs_out():
    oracle = _Oracle()
    servicer = distributed._WakingServicer(oracle, wait_seconds=0.2)
    answer = _create(servicer)
    assert answer.trial.status == protos.get_proto().TrialStatus.IDLE
    assert oracle.asked == 2  # on arrival, and a last look when the wait ran out


class _SlowIdleClient:
    """A chief that held each request (as ``serve_chief`` does) before answering IDLE."""

    def __init__(self, idle_answers, held_seconds):
        self.idle_answers, self.held_seconds, self.calls = idle_answers, held_seconds, 0

    def create_trial(self, tuner_id):
        self.calls += 1
        if self.calls <= self.idle_answers:
            threading.Event().wait(self.held_seconds)
            return trial_module.Trial(hp_module.HyperParameters(), trial_id=None,
                                      status=trial_module.TrialStatus.IDLE)
        return trial_module.Trial(hp_module.HyperParameters(), trial_id="0003",
                                  status=trial_module.TrialStatus.RUNNING)


def test_the_worker_asks_again_at_once_after_an_answer_the_chief_held(monkeypatch):
    sleeps = []
    monkeypatch.setattr(distributed.time, "sleep", sleeps.append)
    client = distributed.BackoffOracleClient(_SlowIdleClient(3, held_seconds=0.1),
                                             min_delay=0.05)
    trial = client.create_trial("tuner0")
    assert trial.status == trial_module.TrialStatus.RUNNING
    assert client.idle_waits == 3 and sleeps == []


def test_the_worker_backs_off_when_idle_answers_come_back_at_once(monkeypatch):
    sleeps = []
    monkeypatch.setattr(distributed.time, "sleep", sleeps.append)
    client = distributed.BackoffOracleClient(_SlowIdleClient(4, held_seconds=0.0),
                                             min_delay=0.05, max_delay=0.2)
    client.create_trial("tuner0")
    assert sleeps == pytest.approx([0.05, 0.1, 0.2, 0.2])
