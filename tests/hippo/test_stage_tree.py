"""StageTree: shared prefixes merge, forks keep identities, state round-trips."""

import itertools
import random

from tfweave.hippo.stage_tree import StageTree


def _step(lr0, milestone, decay, epochs):
    return [({"lr": lr0}, 0, milestone), ({"lr": lr0 * decay}, milestone, epochs)]


def _prefixes(schedules):
    out = set()
    for per_epoch in schedules:
        out.update(tuple(per_epoch[:e + 1]) for e in range(len(per_epoch)))
    return out


def test_trials_sharing_a_prefix_share_its_stages_and_unique_epochs_match_a_prefix_count():
    tree = StageTree()
    grid = list(itertools.product((0.1, 0.01), (2, 4), (0.1, 0.5)))
    leaves = [tree.add_path({}, _step(*g, 6)) for g in grid]
    assert len(set(leaves)) == len(grid)
    per_epoch = [[lr0 if e < m else lr0 * d for e in range(6)] for lr0, m, d in grid]
    assert sum(n.length for n in tree.nodes.values()) == len(_prefixes(per_epoch))


def test_node_ids_do_not_depend_on_insertion_order_or_forks():
    grid = list(itertools.product((0.1, 0.01), (2, 3, 5), (0.1, 0.5)))
    paths = [_step(*g, 6) for g in grid] + [[({"lr": 0.1}, 0, 3)], [({"lr": 0.01}, 0, 1)]]
    first = StageTree()
    ids_first = [first.add_path({"units": 8}, p) for p in paths]
    shuffled = list(range(len(paths)))
    random.Random(0).shuffle(shuffled)
    second = StageTree()
    ids_second = {i: second.add_path({"units": 8}, paths[i]) for i in shuffled}
    assert ids_first == [ids_second[i] for i in range(len(paths))]
    assert set(first.nodes) == set(second.nodes)


def test_a_shorter_trial_forks_a_longer_stage_and_keeps_the_metrics_already_known():
    tree = StageTree()
    long_leaf = tree.add_path({}, [({"lr": 0.1}, 0, 8)])
    node = tree.nodes[long_leaf]
    node.status, node.runs, node.steps = "done", 1, 80
    node.history = {e: {"val_accuracy": e / 10} for e in range(8)}
    short_leaf = tree.add_path({}, [({"lr": 0.1}, 0, 3)])
    middle = tree.nodes[short_leaf]
    assert tree.nodes[long_leaf].parent == short_leaf and middle.end == 3
    assert middle.history == {e: {"val_accuracy": e / 10} for e in range(3)}
    assert middle.steps == 30 and tree.nodes[long_leaf].steps == 50
    assert middle.status == "pending"  # no checkpoint at epoch 3 was ever written


def test_different_constants_make_different_roots():
    tree = StageTree()
    a = tree.add_path({"units": 8}, [({"lr": 0.1}, 0, 2)])
    b = tree.add_path({"units": 16}, [({"lr": 0.1}, 0, 2)])
    assert tree.root_of(a).id != tree.root_of(b).id


def test_state_round_trips_through_its_on_disk_format(tmp_path):
    tree = StageTree()
    for g in itertools.product((0.1, 0.01), (2, 4), (0.5,)):
        tree.add_path({}, _step(*g, 6))
    path = str(tmp_path / "tree.json")
    tree.save(path)
    loaded = StageTree.load(path)
    assert loaded.get_state() == tree.get_state()
    assert [p.name for p in tmp_path.iterdir()] == ["tree.json"]  # no temporary file left
