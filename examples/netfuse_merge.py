"""NetFuse example: fine-tune copies of one model, merge them, get the same predictions.

Four copies of a small classifier start from one base model and are fine-tuned on different
shards of scikit-learn's digits. `tfweave.netfuse.merge` turns their SavedModels into one
merged SavedModel (stock TF ops, servable by TF Serving) that answers for all four in one run.

    python examples/netfuse_merge.py [--members 4] [--out /tmp/netfuse_example]
"""

import argparse
import os
import tempfile

import numpy as np


def fine_tuned_copies(count: int, epochs: int = 3):
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dropout(0.1)(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    base = keras.Model(inputs, outputs)
    base.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    base.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)

    copies = []
    shards = np.array_split(np.random.default_rng(0).permutation(len(x_train)), count)
    for index, shard in enumerate(shards):
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        model.fit(x_train[shard], y_train[shard], epochs=epochs, batch_size=32, verbose=0)
        accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
        print(f"copy {index}: fine-tuned on {len(shard)} digits, test accuracy {accuracy:.3f}")
        copies.append(model)
    return copies, x_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--out", default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="netfuse_example_")

    from tfweave import netfuse

    copies, x_test = fine_tuned_copies(args.members)
    paths = []
    for index, model in enumerate(copies):
        path = os.path.join(work, f"digits_ft{index}", "1")  # TF Serving's version layout
        model.export(path, verbose=False)
        paths.append(path)

    merged_dir = os.path.join(work, "digits_merged", "1")
    netfuse.merge(paths, merged_dir, overwrite=True)
    merged = netfuse.load_merged(merged_dir)
    print(f"merged {merged.num_members} models into {merged_dir}: members {merged.members}")

    # Each member gets its own slice of the test set (its own batch size), all in one run.
    slices = np.array_split(x_test, args.members)
    results = merged.run({name: {"pixels": part} for name, part in zip(merged.members, slices)})
    for name, model, part in zip(merged.members, copies, slices):
        own = model.predict(part, verbose=0)
        got = results[name]["output_0"]
        same = np.array_equal(own.argmax(-1), got.argmax(-1))
        print(f"{name}: {len(part)} digits, max |merged - own| = {np.abs(got - own).max():.2e}, "
              f"identical predictions: {same}")


if __name__ == "__main__":
    main()
