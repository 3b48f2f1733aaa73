"""The NetFuse tests' parity check: merged outputs against each member's own (unmerged) outputs."""

import numpy as np

TOLERANCE = 1e-4  # max abs difference, float32 (the bar)


def member_outputs(model, inputs: dict) -> list:
    """The unmerged model's own outputs, in signature order (output_0, output_1, ...)."""
    import tensorflow as tf
    names = [t.name.split(":")[0] for t in model.inputs]
    args = [inputs[n] for n in names]
    result = model(args[0] if len(args) == 1 else args, training=False)
    return [np.asarray(t) for t in tf.nest.flatten(result)]


def dense_module(seed, head, inputs: int = 3, units: int = 4, bias: bool = True):
    """A tf.Module member whose ``serve`` takes ``x`` ([None, inputs] float32) and returns
    ``head(y, x)`` (a dict of outputs) for its own ``y = x @ w (+ b)``, weights drawn from
    ``seed``."""
    import tensorflow as tf

    class Member(tf.Module):
        def __init__(self):
            r = np.random.default_rng(seed)
            self.w = tf.Variable(r.normal(size=(inputs, units)).astype("float32"))
            self.b = tf.Variable(r.normal(size=(units,)).astype("float32")) if bias else None

        @tf.function(input_signature=[tf.TensorSpec([None, inputs], tf.float32, name="x")])
        def serve(self, x):
            y = tf.matmul(x, self.w)
            return head(y if self.b is None else y + self.b, x)

    return Member()


def save_modules(modules, folder, stem: str) -> list[str]:
    """Saves tf.Modules with a ``serve`` tf.function as SavedModels ``folder/{stem}{i}``
    (``serve`` as ``serving_default``); returns their paths."""
    import tensorflow as tf
    paths = []
    for index, module in enumerate(modules):
        paths.append(str(folder / f"{stem}{index}"))
        tf.saved_model.save(module, paths[-1], signatures={"serving_default": module.serve})
    return paths


def assert_members_match(models, merged_results: dict, inputs: list) -> float:
    """Every member's merged outputs equal its own outputs; returns the worst difference."""
    worst = 0.0
    for index, model in enumerate(models):
        if index not in merged_results:
            continue
        own = member_outputs(model, inputs[index])
        got = merged_results[index]
        assert sorted(got) == [f"output_{j}" for j in range(len(own))]
        for j, expected in enumerate(own):
            actual = got[f"output_{j}"]
            assert actual.shape == expected.shape, (index, j, actual.shape, expected.shape)
            worst = max(worst, float(np.max(np.abs(actual - expected))) if actual.size else 0.0)
    assert worst <= TOLERANCE, f"merged outputs differ from the members' by {worst}"
    return worst
