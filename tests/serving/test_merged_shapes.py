"""Members of a merged model asked about inputs of different shapes in one batch.

The merged graph stacks (or concatenates) the members' rows, so rows that disagree beyond the
batch axis (here: token sequences of different lengths) cannot share a run. A batch that holds
both must still answer every request with its own member's output, in every merge mode, not
fail the whole batch."""

import numpy as np
import pytest

from tfweave.serving.batching import MergedBatchQueue, SharedBatchScheduler, Task
from tfweave.serving.metrics import Metrics

VOCAB, WIDTH, CLASSES = 20, 4, 3


def _write_members(root, count=3):
    import tensorflow as tf

    paths = []
    for i in range(count):
        rng = np.random.default_rng(100 + i)

        class Pooled(tf.Module):
            def __init__(self):
                self.table = tf.Variable(rng.standard_normal((VOCAB, WIDTH)).astype(np.float32))
                self.kernel = tf.Variable(
                    rng.standard_normal((WIDTH, CLASSES)).astype(np.float32))

            @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="tokens")])
            def serve(self, tokens):   # [batch, length] -> mean-pooled embedding -> logits
                pooled = tf.reduce_mean(tf.gather(self.table, tokens), axis=1)
                return {"logits": tf.matmul(pooled, self.kernel)}

        module = Pooled()
        path = str(root / f"member{i}" / "1")
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    return _write_members(tmp_path_factory.mktemp("shapes"))


def _own_logits(path, tokens):
    import tensorflow as tf

    return tf.saved_model.load(path).signatures["serving_default"](
        tokens=tf.constant(tokens))["logits"].numpy()


def _merged(members, tmp_path, **merge_kwargs):
    from tfweave import netfuse
    from tfweave.serving.backends import EmbeddedBackend
    from tfweave.serving.model_config import BatchingParameters, read_netfuse_metadata
    from tfweave.serving.servables import MergedModel

    path = str(tmp_path / "merged" / "1")
    netfuse.merge(members, path, names=["member0", "member1", "member2"], **merge_kwargs)
    scheduler = SharedBatchScheduler(1, Metrics())
    model = EmbeddedBackend(intra_op_threads=1).load(path, "merged", 1)
    merged = MergedModel("merged", 1, model, read_netfuse_metadata(path), scheduler,
                         BatchingParameters(max_batch_size=8, batch_timeout_micros=0))
    return merged, scheduler, model


MODES = {"stock": {}, "stacked": {"stacked": True}, "ragged": {"mode": "ragged"},
         "xla": {"jit_compile": True}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_members_asked_about_different_lengths_in_one_batch_each_get_their_own_answer(
        members, tmp_path, mode):
    merged, scheduler, model = _merged(members, tmp_path, **MODES[mode])
    rng = np.random.default_rng(7)
    # member0: two requests of length 8; member1: one of length 5; member2: one of length 8
    asks = [(0, rng.integers(0, VOCAB, (1, 8))), (0, rng.integers(0, VOCAB, (2, 8))),
            (1, rng.integers(0, VOCAB, (2, 5))), (2, rng.integers(0, VOCAB, (1, 8)))]
    tasks = [Task({"tokens": tokens.astype(np.int32)}, len(tokens), ("logits",), member=i)
             for i, tokens in asks]
    try:
        per_member = [[t for t in tasks if t.member == i] for i in range(3)]
        results = merged.run_members(per_member)
        for i in range(3):
            got = results[i]["logits"]
            want = np.concatenate([_own_logits(members[i], t.inputs["tokens"])
                                   for t in per_member[i]])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"member{i} ({mode})")

        # the same through the queue: every request is answered with its own rows
        queue = merged.queue
        futures = [queue.submit(Task(t.inputs, t.rows, ("logits",), member=t.member))
                   for t in tasks]
        for (i, tokens), future in zip(asks, futures):
            np.testing.assert_allclose(future.result(timeout=60)["logits"],
                                       _own_logits(members[i], tokens.astype(np.int32)),
                                       rtol=1e-5, atol=1e-5, err_msg=f"member{i} ({mode})")
    finally:
        scheduler.stop()
        model.close()


def test_a_merged_queue_batch_holds_one_shape_per_member():
    """take() hands run_members one shape per member (the grouping above relies on it): a
    member's request of another length waits for the next run."""

    class _Merged:
        num_members = 2
        member_names = ["a", "b"]

    scheduler = SharedBatchScheduler(0, Metrics())
    queue = MergedBatchQueue(scheduler, "merged", _Merged(), max_batch_size=8, timeout_s=0.0,
                             max_enqueued_batches=4, batching=True)
    first = Task({"tokens": np.zeros((1, 8), np.int32)}, 1, ("logits",), member=0)
    other = Task({"tokens": np.zeros((1, 5), np.int32)}, 1, ("logits",), member=0)
    same = Task({"tokens": np.zeros((2, 8), np.int32)}, 2, ("logits",), member=0)
    for task in (first, other, same):
        queue.submit(task)
    with scheduler.cv:
        batch = queue.take()
    assert batch[0] == [first] and batch[1] == []
    with scheduler.cv:
        batch = queue.take()
    assert batch[0] == [other]


def test_members_of_a_model_whose_outputs_combine_rows_run_unpadded_with_equal_batches(
        tmp_path):
    """An output centred by its batch's mean changes when padding rows join the batch: the
    merge records it (``unpadded_outputs``) and refuses unequal batches, so a batch of
    members sending 1, 2 and 2 rows runs as two runs, each member's answer its own."""
    import tensorflow as tf

    paths = []
    for i in range(3):
        rng = np.random.default_rng(200 + i)

        class Centred(tf.Module):
            def __init__(self):
                self.kernel = tf.Variable(rng.standard_normal((WIDTH, CLASSES)), dtype=tf.float32)

            @tf.function(input_signature=[tf.TensorSpec([None, WIDTH], tf.float32, name="x")])
            def serve(self, x):
                y = tf.matmul(x, self.kernel)
                return {"centred": y - tf.reduce_mean(y, axis=0, keepdims=True)}

        module = Centred()
        paths.append(str(tmp_path / f"member{i}" / "1"))
        tf.saved_model.save(module, paths[-1], signatures={"serving_default": module.serve})
    merged, scheduler, model = _merged(paths, tmp_path)
    try:
        assert merged.metadata["unpadded_outputs"] == ["centred"]
        rng = np.random.default_rng(9)
        tasks = [Task({"x": rng.standard_normal((rows, WIDTH)).astype(np.float32)}, rows,
                      ("centred",), member=i) for i, rows in enumerate((1, 2, 2))]
        results = merged.run_members([[task] for task in tasks])
        for i, task in enumerate(tasks):
            own = tf.saved_model.load(paths[i]).signatures["serving_default"](
                x=tf.constant(task.inputs["x"]))["centred"].numpy()
            np.testing.assert_allclose(results[i]["centred"], own, rtol=1e-5, atol=1e-5,
                                       err_msg=f"member{i}")
    finally:
        scheduler.stop()
        model.close()
