"""Train a TreeLSTM on Python's own parse trees with tfweave's recursive functions.

Each statement of a few standard-library modules becomes a binary tree (leaves: names,
operators, literal kinds); the model learns the statement's type (Assign, If, Return, ...) from
the tree alone. The TreeLSTM runs through the Invoke op: each node's function calls itself for
its two children, and independent subtrees run in parallel.

    python examples/recursion_treelstm.py [--epochs 3]
"""

import argparse
import logging

from tfweave.recursion import models, trees
from tfweave.recursion.training import train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trees", type=int, default=1200)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data, vocabulary = trees.stdlib_statement_trees(
        max_trees=args.trees, modules=("json/encoder.py", "textwrap.py", "shlex.py",
                                       "argparse.py", "csv.py", "ast.py", "pprint.py"))
    print("data set:", trees.describe(data))
    split = int(0.8 * len(data))
    model = models.TreeClassifier(len(trees.LABELS), "treelstm", len(vocabulary) + 1,
                                  args.hidden)
    run = train_classifier(model, data[:split], data[split:], epochs=args.epochs)
    for epoch, loss in enumerate(run.epoch_losses, 1):
        print(f"epoch {epoch}: training loss {loss:.4f}")
    print(f"test accuracy {run.accuracy:.3f}; loss fell: {run.epoch_losses[-1] < run.epoch_losses[0]}")


if __name__ == "__main__":
    main()
