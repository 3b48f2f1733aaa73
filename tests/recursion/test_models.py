"""TreeRNN / RNTN / TreeLSTM on the Invoke op against the eager Python recursion and the
while-loop baseline; Keras training and SavedModel round trips."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfweave.recursion import models, trees

VOCAB, HIDDEN = 40, 12


@pytest.fixture(scope="module")
def forest():
    rng = np.random.default_rng(3)
    batch = trees.batch_trees([trees.random_tree(rng, int(rng.integers(1, 16)), VOCAB, i % 3)
                               for i in range(7)])
    return batch, {k: tf.constant(v) for k, v in batch.as_inputs().items()}


def _loss_and_grads(cell, encode):
    with tf.GradientTape() as tape:
        h = encode()
        loss = tf.reduce_sum(tf.sin(3.0 * h))
    grads = tape.gradient(loss, cell.trainable_variables)
    return [h] + [tf.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize("cell", ["treelstm", "treernn", "rntn"])
def test_recursive_and_iterative_match_eager_recursion_values_and_gradients(forest, cell):
    batch, inputs = forest
    recursive = models.TreeEncoder(cell, VOCAB, HIDDEN, mode="recursive", seed=1)
    iterative = models.TreeEncoder(cell, VOCAB, HIDDEN, mode="iterative", seed=1)
    iterative.cell = recursive.cell  # one set of weights for all three executors
    reference = _loss_and_grads(recursive.cell, lambda: models.eager_encode(recursive.cell, batch))
    for encoder in (recursive, iterative):
        got = _loss_and_grads(recursive.cell, lambda: encoder(inputs))
        assert got[0].shape == (batch.num_trees, HIDDEN)
        for a, b in zip(got, reference):
            assert np.abs(a.numpy() - b.numpy()).max() <= 1e-5


def test_recursive_encoder_inside_tf_function_matches_eager(forest):
    batch, inputs = forest
    encoder = models.TreeEncoder("treelstm", VOCAB, HIDDEN, seed=2)
    want = models.eager_encode(encoder.cell, batch)
    got = tf.function(encoder)(inputs)
    assert np.abs(got.numpy() - want.numpy()).max() <= 1e-5


def test_keras_model_trains_and_its_loss_falls(forest):
    batch, inputs = forest
    model = models.TreeClassifier(3, "treelstm", VOCAB, HIDDEN, seed=0)
    model.compile(optimizer="adam",
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = []
    for _ in range(15):
        losses.append(float(model.train_on_batch(inputs, batch.labels)))
    assert losses[-1] < losses[0]


def test_saved_model_reloads_in_a_fresh_process_after_loading_the_op_library(forest, tmp_path):
    batch, inputs = forest
    model = models.TreeClassifier(3, "treelstm", VOCAB, HIDDEN, seed=4)
    want = model(inputs).numpy()
    spec = tf.TensorSpec([None], tf.int32)

    class Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[spec, spec, spec, spec])
        def classify(self, left, right, word, roots):
            return self.model({"left": left, "right": right, "word": word, "roots": roots})

    serving = Serving(model)
    tf.saved_model.save(serving, str(tmp_path / "model"),
                        signatures={"serving_default": serving.classify})
    np.savez(tmp_path / "inputs.npz", **batch.as_inputs())
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        from tfweave.ops import load_library
        load_library("invoke")
        loaded = tf.saved_model.load({str(tmp_path / "model")!r})
        inputs = {{k: tf.constant(v) for k, v in np.load({str(tmp_path / "inputs.npz")!r}).items()}}
        out = loaded.signatures["serving_default"](**inputs)
        np.save({str(tmp_path / "out.npy")!r}, list(out.values())[0].numpy())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "out.npy") - want).max() <= 1e-6
