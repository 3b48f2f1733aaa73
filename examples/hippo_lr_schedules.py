"""Hippo as a drop-in for KerasTuner: a grid over learning-rate schedules on scikit-learn's digits.

Trials that share a schedule prefix (same initial learning rate until their milestone) train it
once. Run: python examples/hippo_lr_schedules.py [--plot tree.png]
"""

import argparse
import tempfile

import keras

from tfweave import hippo
from tfweave.hippo import study, tree_plot


def build(hp):
    units = hp.Choice("units", [32])  # constants: the root of the stage tree
    lr = hippo.HyperSchedule.step_decay(  # a sequence-valued hyper-parameter
        hp, "learning_rate", initial=hippo.Choice([0.1, 0.03]),
        milestones=[hippo.Choice([3, 5])], decay=hippo.Choice([0.1, 0.5]))
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(units, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(lr.initial, momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    x, y, x_val, y_val = study.digits()
    # Was: keras_tuner.GridSearch(build, objective="val_accuracy", ...)
    tuner = hippo.GridSearch(build, objective="val_accuracy", seed=1,
                             directory=tempfile.mkdtemp(), project_name="digits")
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=8, verbose=0)
    tuner.results_summary(3)
    print(tuner.get_best_hyperparameters()[0].values)
    if args.plot:
        tree_plot.plot_stage_tree(tuner.oracle.tree, args.plot)


if __name__ == "__main__":
    main()
