"""KerasTuner's chief/worker mode: a chief and two workers on loopback, as separate processes.

The reference is the same study run in one process (``distributed_study.run_single``): with
determinism on, every trial's score and final training state (weights and optimizer slots) must
be the same bits however the stages were spread over workers, killed or restarted.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.hippo import distributed_study

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_study.py")
STAGES = 6  # 2 learning rates for epochs 0-2, then 2 decays each for epochs 2-4


@pytest.fixture(scope="module")
def single_process_result(tmp_path_factory):
    return distributed_study.run_single(str(tmp_path_factory.mktemp("single")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Starts chief and worker processes; kills whatever is still running at teardown."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.port = _free_port()
        self.procs = []

    def start(self, role, tuner_id, *args):
        env = dict(os.environ, KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(self.port), TF_CPP_MIN_LOG_LEVEL="2")
        log = open(os.path.join(self.directory, f"{tuner_id}-{len(self.procs)}.log"), "w")
        proc = subprocess.Popen([sys.executable, SCRIPT, role, self.directory, *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait(self, proc, timeout):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {proc.args[2:4]} did not finish in {timeout} s; logs in "
                        f"{self.directory}")

    def result(self):
        with open(os.path.join(self.directory, "result_chief.json")) as f:
            return json.load(f)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.close()


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _same_study(result, reference):
    assert result["best"] == reference["best"]
    assert result["trials"] == reference["trials"]  # scores and final-state digests, bitwise
    assert all(t["status"] == "COMPLETED" for t in result["trials"].values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_chief_and_two_workers_finish_the_study_exactly_as_one_process_does(
        cluster, single_process_result):
    chief = cluster.start("chief", "chief")
    workers = [cluster.start("worker", f"tuner{i}") for i in range(2)]
    for worker in workers:
        assert cluster.wait(worker, 240) == 0
    assert cluster.wait(chief, 60) == 0
    result = cluster.result()
    _same_study(result, single_process_result)
    assert result["accounting"]["stages_run"] == STAGES
    assert set(result["stage_runs"].values()) == {1}
    _check_timeline(result["accounting"])


def _check_timeline(accounting):
    """Each stage run is on the chief's timeline, in order, and the breakdown adds up."""
    from tfweave.hippo import timeline

    entries = accounting["timeline"]
    assert len(entries) == accounting["stages_run"]
    assert {e["tuner"] for e in entries} <= {"tuner0", "tuner1"}
    slack = 0.05  # the worker's clock phase is sent as a 32-bit float
    for e in entries:
        assert e["handed_out"] <= e["started"] + slack
        assert e["started"] <= e["finished"] + slack
        assert e["finished"] <= e["ended"] + slack
        assert e["fit"] > 0 and e["fit"] + e["load"] + e["save"] <= e["seconds"] + 1e-6
    parts = timeline.breakdown(accounting)
    assert parts["total"]["stages"] == len(entries)
    accounted = sum(v for k, v in parts["total"].items() if k != "stages")
    assert accounted == pytest.approx(parts["makespan"] * len(parts["workers"]), abs=0.5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_killed_mid_stage_loses_only_that_stage(cluster, single_process_result):
    markers = os.path.join(cluster.directory, "markers")
    os.makedirs(markers)
    chief = cluster.start("chief", "chief", "--lease", "4")
    doomed = cluster.start("worker", "tuner0", "--marker-dir", markers, "--sleep", "3")
    survivor = cluster.start("worker", "tuner1", "--marker-dir", markers, "--sleep", "0.5")
    _wait_for(lambda: os.path.exists(os.path.join(markers, "tuner0.running")), 180,
              "worker tuner0 to start a stage")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    assert cluster.wait(survivor, 240) == 0
    assert cluster.wait(chief, 60) == 0
    result = cluster.result()
    _same_study(result, single_process_result)
    accounting = result["accounting"]
    assert accounting["stages_lost"] == 1
    # Every stage completed exactly once: the lost one was rerun, nothing else was.
    assert accounting["stages_run"] == STAGES
    assert set(result["stage_runs"].values()) == {1}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_restarted_chief_reloads_the_study_and_reruns_nothing_finished(
        cluster, single_process_result):
    tree_file = os.path.join(cluster.directory, "study", "stage_tree.json")

    def done_stages():
        try:
            with open(tree_file) as f:
                nodes = json.load(f)["nodes"]
        except (OSError, ValueError):
            return set()
        return {n["id"] for n in nodes if n["parent"] and n["status"] == "done"}

    chief = cluster.start("chief", "chief", "--lease", "10")
    workers = [cluster.start("worker", f"tuner{i}", "--marker-dir", cluster.directory,
                             "--sleep", "1") for i in range(2)]
    _wait_for(lambda: len(done_stages()) >= 2, 180, "two stages to finish")
    chief.send_signal(signal.SIGKILL)
    chief.wait(timeout=30)
    done_before = done_stages()
    assert 2 <= len(done_before) < STAGES
    restarted = cluster.start("chief", "chief", "--resume", "--lease", "10")
    for worker in workers:
        assert cluster.wait(worker, 240) == 0
    assert cluster.wait(restarted, 60) == 0
    result = cluster.result()
    _same_study(result, single_process_result)
    # Finished stages were not trained again, and the ones running across the restart were
    # finished by their workers, not rerun.
    assert result["accounting"]["stages_run"] == STAGES
    assert set(result["stage_runs"].values()) == {1}
    assert done_before <= set(result["stage_runs"])


@pytest.fixture(scope="module")
def single_process_pbt(tmp_path_factory):
    return distributed_study.run_single(str(tmp_path_factory.mktemp("single_pbt")), "pbt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pbt_with_a_chief_and_two_workers_makes_the_single_process_decisions(
        cluster, single_process_pbt):
    chief = cluster.start("chief", "chief", "--study", "pbt")
    workers = [cluster.start("worker", f"tuner{i}", "--study", "pbt") for i in range(2)]
    for worker in workers:
        assert cluster.wait(worker, 240) == 0
    assert cluster.wait(chief, 60) == 0
    result = cluster.result()
    reference = single_process_pbt
    # Rounds end in whatever order the workers finish; the decisions must not depend on it.
    assert len(reference["events"]) == distributed_study.PBT_EPOCHS - 1
    assert result["members"] == reference["members"]
    assert result["events"] == reference["events"]  # who exploited whom, and the explored config
    _same_study(result, reference)
    accounting = result["accounting"]
    assert accounting["executed_epochs"] == 4 * distributed_study.PBT_EPOCHS
    assert set(result["stage_runs"].values()) == {1}
