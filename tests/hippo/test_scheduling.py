"""Critical-path scheduling: the ready stage with the longest estimated remaining path goes first."""

import random

import keras_tuner
import pytest

from tfweave import hippo
from tfweave.hippo.stage_tree import DONE, PENDING, StageTree


def _oracle(tmp_path, tree, scheduling="critical_path"):
    oracle = hippo.StageTreeOracle(objective=keras_tuner.Objective("val_accuracy", "max"),
                                   max_epochs=12, seed=1, scheduling=scheduling)
    oracle._set_project_dir(str(tmp_path), "sched")
    oracle.tree = tree
    return oracle


def _longest_below(tree, node_id):
    """Brute force: every downward path from the node, summed stage by stage."""
    node = tree.nodes[node_id]
    own = node.length if node.status == PENDING else 0
    children = [c for c in node.children if tree.nodes[c].status == PENDING]
    return own + max((_longest_below(tree, c) for c in children), default=0)


def test_the_stage_leading_to_the_longest_remaining_path_goes_first(tmp_path):
    tree = StageTree()
    # A: a 4-epoch stage, then 1 more epoch. B: a 1-epoch stage, then 8 more.
    tree.add_path({}, [({"lr": 1}, 0, 4), ({"lr": 2}, 4, 5)])
    tree.add_path({}, [({"lr": 3}, 0, 1), ({"lr": 4}, 1, 9)])
    ready = {n.config["lr"]: n for n in tree.ready()}
    assert set(ready) == {1, 3}
    assert _oracle(tmp_path / "cp", tree)._next_stage() is ready[3]
    # Depth first (the core's order) would start the longer first stage.
    assert _oracle(tmp_path / "df", tree, "depth_first")._next_stage() is ready[1]


def test_step_time_is_estimated_online_from_finished_stages(tmp_path):
    tree = StageTree()
    tree.add_path({}, [({"lr": 1}, 0, 2), ({"lr": 2}, 2, 6)])
    tree.add_path({}, [({"lr": 1}, 0, 2), ({"lr": 3}, 2, 3)])
    first = next(n for n in tree.nodes.values() if n.config.get("lr") == 1)
    first.status, first.steps, first.seconds, first.checkpoint = DONE, 40, 8.0, "x"
    oracle = _oracle(tmp_path, tree)
    # 20 steps per epoch at 0.2 s per step: 4 s per epoch.
    assert oracle.step_seconds() == pytest.approx(0.2)
    remaining = oracle.remaining_seconds()
    long_child = next(n for n in tree.nodes.values() if n.config.get("lr") == 2)
    assert remaining[long_child.id] == pytest.approx(4 * 4.0)
    assert remaining[first.id] == pytest.approx(4 * 4.0)  # done: only what is below counts
    assert oracle._next_stage() is long_child


@pytest.mark.parametrize("seed", range(5))
def test_choice_matches_a_brute_force_longest_path_on_random_trees(tmp_path, seed):
    rng = random.Random(seed)
    tree = StageTree()
    for _ in range(12):
        cuts = sorted(rng.sample(range(1, 12), rng.randint(1, 3)))
        edges = [0] + cuts + [rng.choice([c for c in range(cuts[-1] + 1, 13)])]
        tree.add_path({}, [({"lr": rng.choice([1, 2, 3])}, s, e)
                           for s, e in zip(edges, edges[1:])])
    oracle = _oracle(tmp_path, tree)
    chosen = oracle._next_stage()
    best = max(_longest_below(tree, n.id) for n in tree.ready())
    assert _longest_below(tree, chosen.id) == best


@pytest.mark.parametrize("scheduling", ["critical_path", "depth_first"])
def test_a_worker_continues_from_the_stage_it_finished_not_from_another_workers(
        tmp_path, scheduling):
    from tests.hippo.oracle_driver import Driver, lr_space, make_oracle

    # Two first stages (one per initial rate): once both are done, their continuations tie.
    oracle = make_oracle(tmp_path, lr_space(initial=(0.1, 0.03)), max_epochs=10,
                         scheduling=scheduling)
    driver = Driver(oracle)
    mine, theirs = oracle.create_trial("tuner0"), oracle.create_trial("tuner1")
    driver.run_stage(mine)
    driver.run_stage(theirs)  # tuner1 reports last
    stage_of = lambda trial: trial.hyperparameters.values["hippo/stage"]  # noqa: E731
    parent_of = lambda trial: trial.hyperparameters.values["hippo/parent"]  # noqa: E731
    assert parent_of(oracle.create_trial("tuner0")) == stage_of(mine)
    assert parent_of(oracle.create_trial("tuner1")) == stage_of(theirs)
