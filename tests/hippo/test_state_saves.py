"""The oracle's state on disk when a stage is reported finished, and how often it is written."""

import json

from tfweave.hippo import oracle as oracle_module
from tfweave.hippo.stage_tree import StageTree

from tests.hippo.oracle_driver import Driver, lr_space, make_oracle


def test_ending_a_stage_writes_the_state_once_with_the_stage_already_done(tmp_path, monkeypatch):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=10)
    driver = Driver(oracle)
    trial = oracle.create_trial("tuner0")
    writes = []
    real = oracle_module.storage.atomic_write_json

    def counting(path, data, **options):
        writes.append(path)
        real(path, data, **options)

    monkeypatch.setattr(oracle_module.storage, "atomic_write_json", counting)
    driver.run_stage(trial)
    oracle_file = oracle._get_oracle_fname()
    assert writes.count(oracle_file) == 1
    with open(oracle_file) as f:
        state = json.load(f)
    stage = trial.hyperparameters.values["hippo/stage"]
    assert StageTree.from_state(state["hippo"]["tree"]).nodes[stage].status == "done"
    assert trial.trial_id in state["end_order"]
