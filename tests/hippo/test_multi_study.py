"""Several studies over one model, data and search space share one stage store on disk."""

import keras_tuner
import pytest

from tfweave import hippo
from tfweave.hippo import study
from tests.hippo.distributed_study import state_digest

SEED = 99
EPOCHS = 4
BATCH = 64


def _space(decay=(0.1, 0.5)):
    return study.LrGrid(initial=(0.1, 0.03), milestones=(2,), decay=decay, units=16)


def _search(tuner):
    x, y, x_val, y_val = study.digits()
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=EPOCHS, batch_size=BATCH,
                 verbose=0)
    return tuner


def _outcome(tuner):
    """Per trial (by its values): score and a digest of its final training state."""
    out = {}
    for trial in tuner.oracle.get_best_trials(100):
        values = tuple(sorted((k, v) for k, v in trial.hyperparameters.values.items()
                              if not k.startswith("hippo/")))
        out[values] = (trial.score,
                       state_digest(trial.hyperparameters.values["hippo/final_checkpoint"]))
    return out


def _random_val_loss(directory, name, store=None):
    tuner = hippo.RandomSearch(_space().build, objective=keras_tuner.Objective("val_loss", "min"),
                               max_trials=3, seed=SEED, directory=str(directory),
                               project_name=name, stage_store=store)
    return _search(tuner)


def test_a_second_study_with_another_search_and_objective_reuses_the_first_studys_stages(
        tmp_path):
    study.seeded(SEED)
    store = str(tmp_path / "store")
    first = _search(hippo.GridSearch(_space().build, objective="val_accuracy", seed=SEED,
                                     directory=str(tmp_path), project_name="grid",
                                     stage_store=store))
    assert first.accounting()["executed_steps"] > 0
    second = _random_val_loss(tmp_path, "random", store)
    alone = _random_val_loss(tmp_path, "random_alone")
    shared, own = second.accounting(), alone.accounting()
    # Every stage of the random study was in the grid study's tree: nothing trained again.
    assert shared["executed_steps"] == 0
    assert shared["stages_reused"] == own["stages_run"]
    assert shared["reused_steps"] == own["executed_steps"]
    # And the study sees exactly what it would have computed alone.
    assert _outcome(second) == _outcome(alone)
    def best(tuner):
        return {k: v for k, v in tuner.get_best_hyperparameters()[0].values.items()
                if not k.startswith("hippo/")}
    assert best(second) == best(alone)


def _grid(directory, name, store=None, space=None, **kwargs):
    space = space or _space()
    return _search(hippo.GridSearch(space.build, objective="val_accuracy", seed=SEED,
                                    directory=str(directory), project_name=name,
                                    stage_store=store, **kwargs))


def test_a_full_study_warm_starts_from_a_finished_sha_tree_and_trains_only_new_stages(
        tmp_path):
    study.seeded(SEED)
    store = str(tmp_path / "store")
    sha = _grid(tmp_path, "sha", store, scheduler="sha", min_epochs=1, factor=2)
    full = _grid(tmp_path, "full", store)
    alone = _grid(tmp_path, "full_alone")
    trained_before = {(n.id, n.start, n.end) for n in sha.oracle.tree.nodes.values()
                      if n.runs}
    new_steps = sum(n.steps for n in alone.oracle.tree.nodes.values()
                    if n.runs and (n.id, n.start, n.end) not in trained_before)
    assert 0 < new_steps < alone.accounting()["executed_steps"]
    assert full.accounting()["executed_steps"] == new_steps
    assert _outcome(full) == _outcome(alone)


def test_a_store_refuses_a_study_over_another_search_space(tmp_path):
    study.seeded(SEED)
    store = str(tmp_path / "store")
    _grid(tmp_path, "small", store, space=study.LrGrid(initial=(0.1,), milestones=(2,),
                                                        decay=(0.5,), units=16))
    with pytest.raises(ValueError, match="another study setup"):
        _grid(tmp_path, "other", store)
