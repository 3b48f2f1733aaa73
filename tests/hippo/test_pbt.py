"""Population-based training as a stage tree (``scheduler="pbt"``).

The synthetic objective (tests/hippo/oracle_driver.py) makes the ranking after each round known
from the learning rates alone (ceiling highest at lr 0.03), so exploit/explore can be checked
against a replay computed by hand from the members' learning-rate sequences.
"""

import pytest

from tfweave import hippo

from tests.hippo.oracle_driver import Driver, make_oracle, synthetic_accuracy

LRS = (0.3, 0.1, 0.03, 0.01)  # synthetic ceilings 0.75, 0.845, 0.95, 0.855
EPOCHS, ROUND = 6, 2
LR_HP = "learning_rate/value_0"


def _constant_lr(hp):
    hippo.HyperSchedule.constant(hp, "learning_rate", hippo.Choice(list(LRS)))


def _run_pbt(tmp_path, seed=7):
    oracle = make_oracle(tmp_path, _constant_lr, max_epochs=EPOCHS, scheduler="pbt",
                         population=4, round_epochs=ROUND, quantile=0.25)
    oracle.scheduler.seed = seed
    stages = []
    Driver(oracle, before_stage=lambda values: stages.append(dict(values))).run()
    return oracle, stages


def _history(lrs):
    accuracy, out = 0.1, []
    for lr in lrs:
        accuracy = synthetic_accuracy(accuracy, lr)
        out.append(accuracy)
    return out


def test_pbt_runs_the_population_in_rounds_and_trains_each_member_once_per_round(tmp_path):
    oracle, stages = _run_pbt(tmp_path)
    acc = oracle.accounting()
    assert acc["trials"] == 4 and acc["trials_completed"] == 4
    assert oracle.scheduler.rounds_done == EPOCHS // ROUND - 1  # decisions between rounds
    assert all(p["rung"] == EPOCHS // ROUND - 1 for p in oracle.paths.values())
    assert sorted((s["hippo/initial_epoch"], s["hippo/epochs"]) for s in stages) == \
        sorted((start, start + ROUND) for start in range(0, EPOCHS, ROUND) for _ in range(4))
    # Exploiting copies a state: no member's prefix is trained again.
    assert acc["executed_epochs"] == 4 * EPOCHS
    # One member per round exploits (quantile 0.25 of 4).
    assert [e["round"] for e in oracle.scheduler.events] == [0, 1]


def test_exploit_branches_from_the_best_member_and_explore_perturbs_its_config(tmp_path):
    oracle, stages = _run_pbt(tmp_path)
    by_id = {p["id"]: p for p in oracle.paths.values()}
    initial = {pid: p.get("initial_values", p["values"])[LR_HP] for pid, p in by_id.items()}
    # Replay the population by hand: per member, its learning rate at every epoch.
    lrs = {pid: [initial[pid]] * EPOCHS for pid in by_id}
    for event in oracle.scheduler.events:
        epoch = event["epoch"]
        scores = {pid: _history(seq[:epoch])[-1] for pid, seq in lrs.items()}
        best = max(scores, key=scores.get)
        worst = min(scores, key=scores.get)
        assert event["from"] == best and event["member"] == worst
        ratio = event["config"]["learning_rate"] / lrs[best][epoch - 1]
        assert min(abs(ratio - 0.8), abs(ratio - 1.2)) < 1e-9
        lrs[worst] = lrs[best][:epoch] + [event["config"]["learning_rate"]] * (EPOCHS - epoch)
        # The loser's next stage was trained from the winner's stage and checkpoint.
        branched = [s for s in stages if s["hippo/initial_epoch"] == epoch
                    and s["hippo/parent"] == event["from_stage"]]
        assert len(branched) == 2  # the winner's own continuation and the exploiting member
        assert {s["hippo/config"] for s in branched} == {
            '{"learning_rate": %r}' % lrs[best][epoch],
            '{"learning_rate": %r}' % event["config"]["learning_rate"]}
        assert all(s["hippo/parent_checkpoint"] for s in branched)
    assert oracle.scheduler.events[0]["from"] == next(p for p, lr in initial.items() if lr == 0.03)
    # Every member's score equals its replayed learning-rate sequence trained alone.
    for trial in oracle.get_best_trials(4):
        assert trial.score == pytest.approx(max(_history(lrs[trial.trial_id])), rel=1e-12)


def test_pbt_is_deterministic_for_a_seed(tmp_path):
    first, _ = _run_pbt(tmp_path / "a", seed=3)
    second, _ = _run_pbt(tmp_path / "b", seed=3)
    assert first.scheduler.events == second.scheduler.events
    assert first.accounting()["unique_epochs"] == second.accounting()["unique_epochs"]


def test_pbt_rejects_a_population_of_one(tmp_path):
    with pytest.raises(ValueError, match="population"):
        make_oracle(tmp_path, _constant_lr, max_epochs=EPOCHS, scheduler="pbt", population=1)


def test_pbt_trains_a_small_population_on_digits(tmp_path):
    from tfweave.hippo import study

    study.seeded(0)
    x, y, x_val, y_val = study.digits()

    def build(hp):
        import keras
        lr = hippo.HyperSchedule.constant(hp, "learning_rate", hippo.Choice([0.3, 0.05, 0.001]))
        return study.mlp(8, 0.0, keras.optimizers.SGD(lr.values[0]))

    tuner = hippo.StageTreeTuner(build, objective="val_accuracy", scheduler="pbt", population=3,
                                 round_epochs=1, quantile=0.34, seed=0, max_epochs=2,
                                 directory=str(tmp_path), project_name="pbt")
    tuner.search(x, y, validation_data=(x_val, y_val), batch_size=128, verbose=0)
    acc = tuner.accounting()
    assert acc["trials_completed"] == 3 and acc["executed_epochs"] == 6
    (event,) = tuner.oracle.scheduler.events
    loser = tuner.oracle.paths[event["member"]]
    leaf = tuner.oracle.tree.nodes[loser["leaf"]]
    assert leaf.parent == event["from_stage"] and leaf.start == 1
    assert leaf.config == event["config"]


def _run_pbt_with_store(tmp_path, name, store, seed):
    oracle = make_oracle(tmp_path / name, _constant_lr, max_epochs=EPOCHS, scheduler="pbt",
                         population=4, round_epochs=ROUND, quantile=0.25, stage_store=store)
    oracle.scheduler.seed = seed
    Driver(oracle).run()
    return oracle


def _scores(oracle):
    return {t.trial_id: t.score for t in oracle.get_best_trials(10)}


def test_a_second_pbt_study_on_a_stage_store_adopts_every_stage_and_decides_the_same(tmp_path):
    store = str(tmp_path / "store")
    first = _run_pbt_with_store(tmp_path, "first", store, seed=3)
    second = _run_pbt_with_store(tmp_path, "second", store, seed=3)
    alone, _ = _run_pbt(tmp_path / "alone", seed=3)
    assert first.accounting()["stages_run"] == alone.accounting()["stages_run"]
    shared = second.accounting()
    assert shared["executed_steps"] == 0 and shared["stages_run"] == 0
    assert shared["stages_reused"] == alone.accounting()["stages_run"]
    # Adopted stages carry their metrics: the same rankings, exploits and scores as alone.
    assert second.scheduler.events == alone.scheduler.events
    assert _scores(second) == _scores(alone)


def test_a_pbt_study_with_other_explore_draws_trains_only_the_stages_that_differ(tmp_path):
    store = str(tmp_path / "store")
    _run_pbt_with_store(tmp_path, "first", store, seed=3)
    warm = _run_pbt_with_store(tmp_path, "warm", store, seed=11)
    alone, _ = _run_pbt(tmp_path / "alone", seed=11)
    acc, own = warm.accounting(), alone.accounting()
    # The first round (before any exploit) is the same population: adopted, not trained.
    assert acc["stages_reused"] >= 4 and acc["stages_run"] > 0
    assert acc["stages_run"] + acc["stages_reused"] == own["stages_run"]
    assert warm.scheduler.events == alone.scheduler.events
    assert _scores(warm) == _scores(alone)
