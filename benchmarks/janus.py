"""JANUS: training-step throughput, eager vs tf.function vs @janus.function.

Workloads (all data generated or shipped: scikit-learn digits, Python's own stdlib sources):
LeNet-style CNN and a small ResNet on digits, a character LSTM language model on stdlib ``.py``
text, a training step with Python side effects and Python-value control flow, a small GAN, and
a REINFORCE policy-gradient loop on a CartPole written in numpy (episodes of varying length);
and two issue-#10 programs: hard-example mining with a plain-Python ranking in the middle of the
step (a graph break: graph, Python, graph) and a divergence check on the loss after the update
(an in-graph guard after variable writes: the step runs on shadow variables).

Each mode builds its own copy of a workload from the same seed. Whether plain tf.function is
*correct* on a workload is measured (its results and Python state after a few steps compared
with eager's), and decides the target: janus >= 0.97x tf.function where tf.function is correct,
janus >= 2x eager where it is not. The deoptimisation cost (a call whose guard fails: one eager
profiled call plus a new trace) is measured against one eager call plus one tf.function trace.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from tfweave.janus.workloads import WORKLOADS, Runner, _digit_batches, lenet

LOG = logging.getLogger("benchmarks.janus")


def _same(a, b) -> bool:
    import tensorflow as tf
    fa, fb = tf.nest.flatten(a), tf.nest.flatten(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        x = x.numpy() if hasattr(x, "numpy") else x
        y = y.numpy() if hasattr(y, "numpy") else y
        if isinstance(x, str) or isinstance(y, str):
            if x != y:
                return False
        elif not np.allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                             rtol=1e-3, atol=1e-4):
            return False
    return True


def tf_function_is_correct(name, steps=4) -> bool:
    """Runs eager and tf.function copies side by side and compares outputs and state."""
    eager, graph = Runner(name, "eager"), Runner(name, "tf.function")
    try:
        for _ in range(steps):
            if not _same(eager.run(1), graph.run(1)):
                return False
        return _same(eager.probe(), graph.probe())
    except Exception as error:  # tf.function failing is a verdict, not a benchmark failure
        LOG.info("%s: tf.function fails: %s", name, error)
        return False


def deopt_overhead(report, quick):
    """A guard-failing call vs one eager call plus one trace of the same step."""
    import tensorflow as tf
    from benchmarks.harness import ratio_row
    from tfweave import janus
    repeats = 2 if quick else 4
    deopt_times, eager_times, trace_times = [], [], []
    x, y = next(_digit_batches())
    for r in range(repeats):
        step, _, _, _ = lenet(tf, seed=r)
        scale = {"value": 1.0}

        def scaled_step(x, y, scale=scale):
            return step(x * scale["value"], y)
        jf = janus.function(scaled_step)
        for _ in range(3):
            jf(x, y)
        scale["value"] = 1.0 + 0.5 * (r + 1)  # the closure's dict value is guarded: deopt
        start = time.perf_counter()
        jf(x, y)
        deopt_times.append(time.perf_counter() - start)
        assert jf.stats()["deopts"] >= 1
        start = time.perf_counter()
        scaled_step(x, y)
        eager_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        tf.function(scaled_step).get_concrete_function(
            tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype))
        trace_times.append(time.perf_counter() - start)
    deopt, budget = float(np.median(deopt_times)), float(np.median(eager_times) +
                                                          np.median(trace_times))
    report.add(ratio_row("deopt-overhead/lenet (one guard failure)", candidate_name="janus deopt",
                         baseline_name="1 eager call + 1 trace", candidate_value=deopt,
                         baseline_value=budget, higher_is_better=False, target=1.0,
                         extra={"deopt_s": deopt, "eager_s": float(np.median(eager_times)),
                                "trace_s": float(np.median(trace_times))}))


def run(report, quick: bool):
    from benchmarks.harness import compare
    repeats, steps = (3, 2) if quick else (7, 8)
    names = list(WORKLOADS) if not quick else ["lenet/digits", "side-effects+python-control/digits",
                                               "reinforce/cartpole", "graph-break/digits",
                                               "guard-after-write/digits"]
    for name in names:
        correct = tf_function_is_correct(name)
        LOG.info("%s: tf.function %s", name, "correct" if correct else "WRONG or failing")
        # tf.function is run only where it is correct (it raises on some programs)
        modes = ("eager", "tf.function", "janus") if correct else ("eager", "janus")
        runners = {mode: Runner(name, mode) for mode in modes}
        for runner in runners.values():
            runner.run(3)  # janus profiles and builds here; tf.function traces
        jan = runners["janus"]
        if correct:
            report.add(compare(f"{name}", lambda: jan.run(steps),
                               lambda: runners["tf.function"].run(steps),
                               candidate_name="janus", baseline_name="tf.function",
                               repeats=repeats, target=0.97))
        report.add(compare(f"{name}", lambda: jan.run(steps), lambda: runners["eager"].run(steps),
                           candidate_name="janus", baseline_name="eager", repeats=repeats,
                           target=None if correct else 2.0,
                           extra={"tf_function_correct": correct}))
        stats = _counts(jan.step.stats())
        report.notes.append(
            f"{name}: tf.function {'correct' if correct else 'wrong/failing'}; janus step ran "
            f"{stats['graph_calls']}/{stats['calls']} calls as graphs, {stats['traces']} traces, "
            f"{stats['deopts']} deopts{stats['breaks']}")
    deopt_overhead(report, quick)
    long_run_deopt_rate(report, quick)
    recursive_models(report, quick)


class _Node:
    def __init__(self, word, left=None, right=None):
        self.word, self.left, self.right = word, left, right


def _as_nodes(tree):
    """A recursion-part post-order array tree as plain Python node objects."""
    nodes = []
    for n in range(tree.size):
        if tree.left[n] < 0:
            nodes.append(_Node(int(tree.word[n])))
        else:
            nodes.append(_Node(0, nodes[tree.left[n]], nodes[tree.right[n]]))
    return nodes[-1]


def recursive_models(report, quick):
    """TreeRNN/TreeLSTM written as plain recursive Python: training throughput, janus vs eager.

    The recursion issue's data (statement trees of Python's stdlib). janus keeps the recursion
    symbolic (one recursive graph through the Invoke op); tf.function cannot take a Python tree
    object (it would retrace and unroll for every new tree), so eager is the baseline.
    """
    import tensorflow as tf
    from benchmarks.harness import compare
    from tfweave import janus
    from tfweave.recursion.cells import TreeLSTMCell, TreeRNNCell
    from tfweave.recursion.trees import stdlib_statement_trees
    trees, vocabulary = stdlib_statement_trees(64 if quick else 256, max_leaves=24)
    roots = [_as_nodes(t) for t in trees]
    labels = tf.constant([t.label for t in trees], tf.int32)
    batch = 8
    for cell_type in (TreeRNNCell, TreeLSTMCell):
        def make(mode):
            tf.keras.utils.set_random_seed(0)
            cell = cell_type(len(vocabulary) + 1, 32, seed=0)
            head = tf.keras.layers.Dense(int(labels.numpy().max()) + 1)
            opt = tf.keras.optimizers.SGD(0.05)

            def encode(node):
                if node.left is None:
                    return cell.leaf(node.word)
                return cell.combine(encode(node.left), encode(node.right))
            if mode == "janus":
                encode = janus.function(encode)
            state = {"i": 0, "encode": encode}

            def steps(n=2):
                for _ in range(n):
                    i = state["i"] % (len(roots) - batch)
                    state["i"] += batch
                    with tf.GradientTape() as tape:
                        h = tf.concat([state["encode"](r)[0] for r in roots[i:i + batch]], 0)
                        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                            labels[i:i + batch], head(h), from_logits=True))
                    variables = cell.trainable_variables + head.trainable_variables
                    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
                return loss
            return steps, encode
        jan, jan_encode = make("janus")
        eager, _ = make("eager")
        jan(1), eager(1)
        name = cell_type.__name__.replace("Cell", "")
        report.add(compare(f"{name} training (plain recursive Python, stdlib trees, batch {batch})",
                           jan, eager, candidate_name="janus", baseline_name="eager",
                           repeats=3 if quick else 7, target=3.0,
                           extra={"tf_function_correct": False}))
        tree = jan_encode.tree
        report.notes.append(f"{name}: janus ran {tree.graph_calls} tree encodings through one "
                            f"recursive graph (Invoke op), {tree.eager_calls} eagerly")


def _counts(stats) -> dict:
    """Whole-function counts, or for a function split at graph breaks its segments' counts."""
    out = dict(stats, breaks="")
    segments = stats.get("segments")
    if segments:
        graphs = segments["graph_segments"]
        out["graph_calls"] = min(s["graph_calls"] for s in graphs)  # calls where all ran as graphs
        out["traces"] = stats["traces"] + sum(s["traces"] for s in graphs)
        out["deopts"] = stats["deopts"] + sum(s["deopts"] for s in graphs)
        out["breaks"] = (f" (split at {segments['python_segments']} graph break(s) into "
                         f"{len(graphs)} graph segments)")
    return out


def long_run_deopt_rate(report, quick):
    """Deoptimisation rate over a long run (several epochs of digits) of a fresh janus step."""
    from benchmarks.harness import ratio_row
    steps = 40 if quick else 400
    for name in ("side-effects+python-control/digits", "graph-break/digits",
                 "guard-after-write/digits"):
        runner = Runner(name, "janus")
        runner.run(steps)
        stats = _counts(runner.step.stats())
        rate = stats["deopts"] / stats["calls"]
        report.add(ratio_row(f"long-run/{name} ({steps} steps)", candidate_name="janus graph calls",
                             baseline_name="all calls", candidate_value=stats["graph_calls"],
                             baseline_value=stats["calls"], higher_is_better=True,
                             extra={"deopts": stats["deopts"], "deopt_rate": rate,
                                    "traces": stats["traces"]}))
        report.notes.append(f"long run {name}: {stats['deopts']} deopts in {stats['calls']} calls "
                            f"(rate {rate:.4f}), {stats['graph_calls']} calls fully as graphs, "
                            f"{stats['traces']} traces{stats['breaks']}")
