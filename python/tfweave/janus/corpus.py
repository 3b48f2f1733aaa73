"""A corpus of small imperative TensorFlow programs, run eagerly, under tf.function and JANUS.

Each program is Python source that defines ``driver(wrap)`` (it decorates its function with
``wrap``, calls it several times with inputs chosen to make guards fail, and returns the
results) and ``state()`` (the Python and TF state the calls left behind). Every run of a program
executes its source afresh in its own module namespace, so eager, ``tf.function`` and
``@janus.function`` each start from the same state. What plain ``tf.function`` does is measured
by running it, never written down: ``python -m tfweave.janus.corpus --table`` prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import linecache
import logging
import math
import re
import sys
import textwrap
import types
from dataclasses import dataclass

LOG = logging.getLogger(__name__)
_counter = itertools.count()


@dataclass(frozen=True)
class Program:
    name: str
    area: str
    what: str
    source: str


PROGRAMS: list[Program] = []


def program(name, area, what, source):
    PROGRAMS.append(Program(name, area, what, textwrap.dedent(source)))


# --- plain tensor code: tf.function is right here, JANUS must match it ------------------------
program("mlp_forward", "tensor code", "dense layer with global weights", """
    W = tf.Variable(tf.reshape(tf.range(12, dtype=tf.float32), [4, 3]) / 10.0)
    def fn(x):
        return tf.nn.relu(tf.matmul(x, W) - 0.5)
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2, 4]) * i) for i in range(4)]
    def state():
        return W.numpy()
""")
program("batch_size_varies", "tensor code", "batch dimension changes: shape relaxed to None", """
    def fn(x):
        return tf.reduce_mean(x * x, axis=1)
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([n, 3]) * n) for n in (2, 2, 2, 5, 7, 1)]
    def state():
        return None
""")
program("dtype_changes", "tensor code", "float32 then float64 input: a second graph", """
    def fn(x):
        return x * 2 + 1
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant([1.0, 2.0])), f(tf.constant([1.0, 2.0])),
                f(tf.constant([1.0, 2.0], tf.float64)), f(tf.constant([3.0, 4.0])),
                f(tf.constant([5.0], tf.float64))]
    def state():
        return None
""")
program("scalar_arg_storm", "tensor code", "new Python float every call (retracing storm)", """
    def fn(x, scale):
        return x * scale
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([3]), 0.5 + i) for i in range(8)]
    def state():
        return None
""")
program("loop_count_arg", "tensor code", "Python loop bound from an int argument", """
    def fn(x, n):
        for _ in range(n):
            x = x * 1.5 + 1.0
        return x
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]), n) for n in (3, 3, 3, 4, 1, 6)]
    def state():
        return None
""")
program("training_flag", "tensor code", "bool flag toggles a Python branch", """
    def fn(x, training):
        if training:
            x = tf.nn.dropout(x, rate=0.0) * 2.0
        else:
            x = x - 1.0
        return x
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]), t) for t in (True, True, False, True, False)]
    def state():
        return None
""")
program("keyword_defaults", "tensor code", "keyword arguments and defaults", """
    def fn(x, bias=1.0, *, power=2):
        return x ** power + bias
    def driver(wrap):
        f = wrap(fn)
        x = tf.constant([1.0, 2.0])
        return [f(x), f(x), f(x, bias=3.0), f(x, power=3), f(x, 0.5, power=2)]
    def state():
        return None
""")
program("dict_input", "tensor code", "a dict of tensors as the argument", """
    def fn(batch):
        return batch["a"] * 2 + tf.reduce_sum(batch["b"])
    def driver(wrap):
        f = wrap(fn)
        return [f({"a": tf.ones([2]) * i, "b": tf.ones([3])}) for i in range(3)] + \\
               [f({"a": tf.ones([4]), "b": tf.ones([1])})]
    def state():
        return None
""")
program("numpy_input", "tensor code", "numpy arrays as arguments", """
    def fn(x):
        return tf.reduce_sum(x * 3)
    def driver(wrap):
        f = wrap(fn)
        return [f(np.arange(4, dtype=np.float32) + i) for i in range(4)]
    def state():
        return None
""")
program("tensor_if", "tensor code", "if on a tensor test (AutoGraph cond)", """
    def fn(x):
        if tf.reduce_sum(x) > 0:
            y = x * 2
        else:
            y = -x
        return y
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([1.0, 2.0], [1.0, 1.0], [-5.0, 1.0], [3.0, 0.0])]
    def state():
        return None
""")
program("tensor_while", "tensor code", "while loop on a tensor test", """
    def fn(x):
        while tf.reduce_max(x) > 1.0:
            x = x / 2.0
        return x
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([8.0, 1.0], [8.0, 2.0], [100.0, 3.0], [0.5, 0.1])]
    def state():
        return None
""")

# --- Python control flow on tensor values ---------------------------------------------------
program("numpy_branch", "control flow on tensor values", "if x.numpy() > 0, the branch flips", """
    def fn(x):
        if x.numpy() > 0:
            return x * 2
        return x - 100
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in (1.0, 2.0, 3.0, -1.0, 4.0, -2.0)]
    def state():
        return None
""")
program("numpy_method_branch", "control flow on tensor values",
        "numpy methods on x.numpy() in a branch test", """
    def fn(x):
        if x.numpy().sum() > 0:
            return x * 2
        return x - 100
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([1.0], [1.0], [3.0], [-1.0], [4.0], [-2.0])]
    def state():
        return None
""")
program("bool_tensor_branch", "control flow on tensor values", "if bool(tensor)", """
    def fn(x):
        y = x + 1
        if bool(tf.reduce_any(y > 3.0)):
            y = tf.clip_by_value(y, 0.0, 3.0)
        return y
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([0.0, 1.0], [0.5, 1.0], [5.0, 1.0], [0.0, 0.0])]
    def state():
        return None
""")
program("int_tensor_range", "control flow on tensor values", "range(int(tensor)) loop bound", """
    def fn(x, n):
        for _ in range(int(n)):
            x = x * 2
        return x
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]), tf.constant(k)) for k in (2, 2, 2, 3, 1, 4)]
    def state():
        return None
""")
program("python_list_loop", "control flow on tensor values",
        "data-dependent Python while loop building a list", """
    def fn(x):
        parts = []
        while float(tf.reduce_max(x)) > 1.0:
            parts.append(x)
            x = x / 2.0
        parts.append(x)
        return tf.stack(parts)
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([4.0, 1.0], [4.0, 2.0], [4.0, 3.0], [16.0, 1.0],
                                            [4.0, 0.0])]
    def state():
        return None
""")
program("item_value", "control flow on tensor values", ".item() selects from a Python list", """
    TABLE = [10.0, 20.0, 30.0]
    def fn(i, x):
        k = i.numpy().item()
        return x * TABLE[k]
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(k), tf.ones([2])) for k in (0, 0, 0, 2, 1, 2)]
    def state():
        return None
""")
program("python_float_accumulate", "control flow on tensor values",
        "float(loss) summed in a local Python float", """
    def fn(xs):
        total = 0.0
        for x in xs:
            total += float(tf.reduce_sum(x))
        return total
    def driver(wrap):
        f = wrap(fn)
        return [f([tf.ones([2]) * i, tf.ones([3])]) for i in range(5)]
    def state():
        return None
""")

# --- Python side effects ---------------------------------------------------------------------
program("print_each_call", "side effects", "print on every call", """
    def fn(x):
        y = x * 3
        print("y =", y.numpy().tolist())
        return y
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant([float(i)])) for i in range(4)]
    def state():
        return None
""")
program("append_global_list", "side effects", "appends tensor values to a global list", """
    LOG = []
    def fn(x):
        y = tf.reduce_sum(x * x)
        LOG.append(float(y))
        return y
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]) * i) for i in range(5)]
    def state():
        return LOG
""")
program("global_counter", "side effects", "global call counter (written only)", """
    CALLS = 0
    def fn(x):
        global CALLS
        CALLS += 1
        return x + 1
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2])) for _ in range(5)]
    def state():
        return CALLS
""")
program("counter_read_back", "side effects", "a step counter the function reads back", """
    class Trainer:
        def __init__(self):
            self.step = 0
        def fn(self, x):
            self.step += 1
            if self.step % 2 == 0:
                x = x * 10
            return x + self.step
    T = Trainer()
    def driver(wrap):
        Trainer.fn = wrap(Trainer.fn)
        return [T.fn(tf.ones([2])) for _ in range(6)]
    def state():
        return T.step
""")
program("attribute_write", "side effects", "stores the last output on an object", """
    class Box:
        last = None
    BOX = Box()
    def fn(x):
        y = tf.tanh(x)
        BOX.last = y
        return y * 2
    def driver(wrap):
        f = wrap(fn)
        out = []
        for i in range(4):
            out.append(f(tf.constant([float(i)])))
            out.append(BOX.last)
        return out
    def state():
        return BOX.last
""")
program("nonlocal_counter", "side effects", "closure counter via nonlocal", """
    def make():
        count = 0
        def fn(x):
            nonlocal count
            count += 1
            return x * 2
        return fn, lambda: count
    FN, COUNT = make()
    def driver(wrap):
        f = wrap(FN)
        return [f(tf.ones([1])) for _ in range(4)]
    def state():
        return COUNT()
""")
program("dict_cache_write", "side effects", "writes results into a global dict", """
    CACHE = {}
    def fn(x, key):
        y = x + 1
        CACHE[key] = float(tf.reduce_sum(y))
        return y
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]) * i, f"k{i % 2}") for i in range(5)]
    def state():
        return sorted(CACHE.items())
""")
program("helper_with_effects", "side effects", "calls a helper that logs", """
    SEEN = []
    def record(name, value):
        SEEN.append((name, round(float(value), 5)))
    def fn(x):
        y = tf.reduce_mean(x)
        record("mean", y)
        z = y * 2
        record("double", z)
        return z
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant([1.0, 2.0]) * i) for i in range(4)]
    def state():
        return SEEN
""")
program("effect_in_tensor_loop", "side effects", "append inside a tensor-driven loop", """
    TRACE = []
    def fn(x):
        while tf.reduce_sum(x) < 10.0:
            x = x * 2.0
            TRACE.append(float(tf.reduce_sum(x)))
        return x
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([1.0, 1.0], [3.0, 1.0], [0.5, 0.5], [20.0, 0.0])]
    def state():
        return TRACE
""")
program("print_after_assign", "side effects", "print of a variable after an update", """
    V = tf.Variable(0.0)
    def fn(x):
        V.assign_add(tf.reduce_sum(x))
        print("v is now", V.numpy())
        return V.read_value()
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]) * i) for i in range(4)]
    def state():
        return V.numpy()
""")
program("loss_history", "side effects", "training step appending loss to an attribute list", """
    class Model:
        def __init__(self):
            self.w = tf.Variable([0.5, -0.5])
            self.history = []
        def step(self, x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((tf.reduce_sum(x * self.w, axis=1) - y) ** 2)
            grad = tape.gradient(loss, self.w)
            self.w.assign_sub(0.1 * grad)
            self.history.append(float(loss))
            return loss
    M = Model()
    def driver(wrap):
        Model.step = wrap(Model.step)
        x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
        return [M.step(x, tf.constant([1.0, 2.0])) for _ in range(5)]
    def state():
        return M.history, M.w.numpy()
""")
program("running_sum_attribute", "side effects", "a tensor running sum kept on an object", """
    class Meter:
        def __init__(self):
            self.total = tf.constant(0.0)
            self.count = 0
        def update(self, x):
            self.total = self.total + tf.reduce_sum(x)
            self.count += 1
            return self.total / self.count
    M = Meter()
    def driver(wrap):
        Meter.update = wrap(Meter.update)
        return [M.update(tf.ones([3]) * i) for i in range(5)]
    def state():
        return M.total, M.count
""")
program("best_loss_tracker", "side effects", "keeps the best loss seen in a Python float", """
    class Tracker:
        def __init__(self):
            self.best = 1e9
            self.improved = 0
        def fn(self, loss):
            value = float(loss)
            if value < self.best:
                self.best = value
                self.improved += 1
            return self.best
    T = Tracker()
    def driver(wrap):
        Tracker.fn = wrap(Tracker.fn)
        return [T.fn(tf.constant(v)) for v in (5.0, 4.0, 6.0, 3.0, 3.5, 1.0)]
    def state():
        return T.best, T.improved
""")

# --- globals, attributes and closures that change ---------------------------------------------
program("global_scale_changes", "outside state changes", "a global hyper-parameter changes", """
    SCALE = 2.0
    def fn(x):
        return x * SCALE
    def driver(wrap):
        global SCALE
        f = wrap(fn)
        out = [f(tf.ones([2])) for _ in range(3)]
        SCALE = 5.0
        out += [f(tf.ones([2])) for _ in range(2)]
        SCALE = 7.0
        out.append(f(tf.ones([2])))
        return out
    def state():
        return SCALE
""")
program("attribute_hparam_changes", "outside state changes", "self.lr changes between steps", """
    class Opt:
        def __init__(self):
            self.lr = 0.1
            self.w = tf.Variable([1.0, 1.0])
        def step(self, g):
            self.w.assign_sub(self.lr * g)
            return self.w.read_value()
    O = Opt()
    def driver(wrap):
        Opt.step = wrap(Opt.step)
        out = [O.step(tf.ones([2])) for _ in range(3)]
        O.lr = 0.01
        out += [O.step(tf.ones([2])) for _ in range(3)]
        return out
    def state():
        return O.w.numpy()
""")
program("global_function_rebound", "outside state changes", "the activation function is rebound", """
    ACT = tf.nn.relu
    def fn(x):
        return ACT(x)
    def driver(wrap):
        global ACT
        f = wrap(fn)
        x = tf.constant([-1.0, 2.0])
        out = [f(x), f(x), f(x)]
        ACT = tf.tanh
        out += [f(x), f(x)]
        return out
    def state():
        return None
""")
program("closure_value_changes", "outside state changes", "a closure variable changes", """
    def make():
        cfg = {"offset": 1.0}
        def fn(x):
            return x + cfg["offset"]
        return fn, cfg
    FN, CFG = make()
    def driver(wrap):
        f = wrap(FN)
        out = [f(tf.ones([2])) for _ in range(3)]
        CFG["offset"] = 10.0
        out += [f(tf.ones([2])) for _ in range(2)]
        return out
    def state():
        return CFG
""")
program("layer_list_grows", "outside state changes", "a global list of layers grows", """
    LAYERS = [tf.Variable(2.0), tf.Variable(3.0)]
    def fn(x):
        for w in LAYERS:
            x = x * w
        return x
    def driver(wrap):
        f = wrap(fn)
        out = [f(tf.ones([2])) for _ in range(3)]
        LAYERS.append(tf.Variable(0.5))
        out += [f(tf.ones([2])) for _ in range(2)]
        return out
    def state():
        return [v.numpy() for v in LAYERS]
""")
program("object_attribute_mutated", "outside state changes",
        "an argument object's attribute changes (tf.function keys it by identity)", """
    class Config:
        def __init__(self):
            self.depth = 2
    CFG = Config()
    def fn(x, cfg):
        for _ in range(cfg.depth):
            x = x + 1
        return x
    def driver(wrap):
        f = wrap(fn)
        out = [f(tf.zeros([2]), CFG) for _ in range(3)]
        CFG.depth = 5
        out += [f(tf.zeros([2]), CFG) for _ in range(2)]
        return out
    def state():
        return CFG.depth
""")
program("global_tensor_rebound", "outside state changes", "a global tensor is rebound", """
    OFFSET = tf.constant([1.0, 1.0])
    def fn(x):
        return x + OFFSET
    def driver(wrap):
        global OFFSET
        f = wrap(fn)
        out = [f(tf.ones([2])) for _ in range(3)]
        OFFSET = tf.constant([5.0, 6.0])
        out += [f(tf.ones([2])) for _ in range(2)]
        return out
    def state():
        return None
""")

# --- Python types that vary ---------------------------------------------------------------
program("int_float_tensor_arg", "varying types", "argument is an int, a float, then a tensor", """
    def fn(x, s):
        return x * s
    def driver(wrap):
        f = wrap(fn)
        x = tf.ones([2])
        return [f(x, 2), f(x, 2), f(x, 2.5), f(x, tf.constant(3.0)), f(x, 4), f(x, 4.5)]
    def state():
        return None
""")
program("optional_mask", "varying types", "an optional argument is None or a tensor", """
    def fn(x, mask=None):
        if mask is not None:
            x = x * mask
        return tf.reduce_sum(x)
    def driver(wrap):
        f = wrap(fn)
        x = tf.constant([1.0, 2.0, 3.0])
        return [f(x), f(x), f(x, tf.constant([1.0, 0.0, 1.0])), f(x), f(x, tf.ones([3]))]
    def state():
        return None
""")
program("list_length_varies", "varying types", "a list argument changes length", """
    def fn(xs):
        total = tf.zeros([2])
        for x in xs:
            total += x
        return total
    def driver(wrap):
        f = wrap(fn)
        return [f([tf.ones([2])] * n) for n in (2, 2, 2, 3, 1, 3)]
    def state():
        return None
""")
program("string_mode", "varying types", "a string argument picks the computation", """
    def fn(x, mode):
        if mode == "sum":
            return tf.reduce_sum(x)
        elif mode == "max":
            return tf.reduce_max(x)
        return tf.reduce_min(x)
    def driver(wrap):
        f = wrap(fn)
        x = tf.constant([3.0, -1.0, 2.0])
        return [f(x, m) for m in ("sum", "sum", "max", "min", "sum", "max")]
    def state():
        return None
""")
program("returns_python_value", "varying types", "returns a Python int computed from a tensor", """
    def fn(x):
        return int(tf.reduce_sum(x)) + 1
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([1, 2], [1, 2], [1, 2], [3, 4], [5, 5])]
    def state():
        return None
""")

# --- variables, optimizers, Keras -------------------------------------------------------------
program("linear_regression_sgd", "training", "GradientTape + manual SGD on variables", """
    W = tf.Variable([[0.1], [0.2]])
    B = tf.Variable([0.0])
    def fn(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((tf.matmul(x, W) + B - y) ** 2)
        gw, gb = tape.gradient(loss, [W, B])
        W.assign_sub(0.05 * gw)
        B.assign_sub(0.05 * gb)
        return loss
    def driver(wrap):
        f = wrap(fn)
        x = tf.constant([[1.0, 2.0], [2.0, 1.0], [0.0, 1.0]])
        y = tf.constant([[1.0], [2.0], [0.5]])
        return [f(x, y) for _ in range(5)] + [f(x[:2], y[:2])]
    def state():
        return W.numpy(), B.numpy()
""")
program("keras_model_train_step", "training", "Keras model + Keras optimizer training step", """
    keras = tf.keras
    keras.utils.set_random_seed(0)
    MODEL = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    OPT = keras.optimizers.SGD(0.01)
    def fn(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((MODEL(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, MODEL.trainable_variables)
        OPT.apply_gradients(zip(grads, MODEL.trainable_variables))
        return loss
    def driver(wrap):
        f = wrap(fn)
        x = tf.reshape(tf.range(12, dtype=tf.float32), [3, 4]) / 10.0
        y = tf.constant([[1.0], [0.0], [1.0]])
        return [f(x, y) for _ in range(5)]
    def state():
        return [v.numpy() for v in MODEL.trainable_variables]
""")
program("variable_value_branch", "training", "Python branch on a variable's value, then reset", """
    V = tf.Variable(0.0)
    RESETS = []
    def fn(x):
        if float(V) > 5.0:
            V.assign(0.0)
            RESETS.append(1)
        V.assign_add(tf.reduce_sum(x))
        return V.read_value()
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2])) for _ in range(8)]
    def state():
        return V.numpy(), len(RESETS)
""")
program("gradient_clip_python", "training", "clips gradients when a Python norm check fires", """
    W = tf.Variable([3.0, -4.0])
    CLIPPED = []
    def fn(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((W * x) ** 2)
        g = tape.gradient(loss, W)
        norm = tf.norm(g)
        if norm.numpy() > 10.0:
            g = g * (10.0 / norm)
            CLIPPED.append(True)
        W.assign_sub(0.01 * g)
        return loss
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([1.0, 1.0], [1.0, 1.0], [0.1, 0.1], [1.0, 1.0],
                                            [0.1, 0.1])]
    def state():
        return W.numpy(), len(CLIPPED)
""")

# --- calls into non-TF Python code -------------------------------------------------------------
program("math_constant_fold", "non-TF Python", "math.sqrt of a Python config value", """
    DIM = 16
    def fn(x):
        return x / math.sqrt(DIM)
    def driver(wrap):
        global DIM
        f = wrap(fn)
        out = [f(tf.ones([2])) for _ in range(3)]
        DIM = 64
        out.append(f(tf.ones([2])))
        return out
    def state():
        return None
""")
program("numpy_on_values", "non-TF Python", "numpy computation on a tensor's value", """
    def fn(x):
        v = np.clip(x.numpy(), 0.0, 1.0)
        return tf.constant(np.cumsum(v))
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant(v)) for v in ([0.5, 2.0], [0.2, -1.0], [0.9, 0.9], [3.0, 0.1])]
    def state():
        return None
""")
program("python_random", "non-TF Python", "random.random() picks a scale each call", """
    random.seed(3)
    def fn(x):
        return x * random.random()
    def driver(wrap):
        random.seed(3)
        f = wrap(fn)
        return [f(tf.ones([2])) for _ in range(4)]
    def state():
        return None
""")
program("python_recursion_int", "non-TF Python", "pure Python recursion on an int argument", """
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)
    def fn(x, n):
        return x * fib(n)
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]), n) for n in (5, 5, 5, 7, 3)]
    def state():
        return None
""")
program("creates_variable_each_call", "non-TF Python", "makes a new tf.Variable per call", """
    MADE = []
    def fn(x):
        v = tf.Variable(tf.ones_like(x))
        v.assign_add(x)
        MADE.append(v)
        return v.read_value()
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.ones([2]) * i) for i in range(3)]
    def state():
        return len(MADE)
""")
program("string_formatting", "non-TF Python", "formats a report string from tensor values", """
    REPORTS = []
    def fn(x):
        m = tf.reduce_mean(x)
        REPORTS.append("mean=%.3f max=%.3f" % (float(m), float(tf.reduce_max(x))))
        return m
    def driver(wrap):
        f = wrap(fn)
        return [f(tf.constant([1.0, 2.0]) * i) for i in range(4)]
    def state():
        return REPORTS
""")


# --------------------------------------------------------------------------------------------
# running and comparing
# --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    results: object = None
    state: object = None
    stdout: str = ""
    error: str | None = None
    janus_stats: dict | None = None  # summed JanusFunction.stats() of the functions it made


def instantiate(prog: Program) -> dict:
    """Executes the program's source in a fresh module namespace (its own globals)."""
    import numpy as np
    import random
    import tensorflow as tf
    filename = f"<janus-corpus {prog.name} #{next(_counter)}>"
    linecache.cache[filename] = (len(prog.source), None, prog.source.splitlines(True), filename)
    module = types.ModuleType(f"janus_corpus_{prog.name}")
    module.__dict__.update(tf=tf, np=np, math=math, random=random)
    sys.modules[module.__name__] = module
    exec(compile(prog.source, filename, "exec"), module.__dict__)
    return module.__dict__


def wrapper(mode: str):
    import tensorflow as tf
    from tfweave import janus
    if mode == "eager":
        return lambda fn: fn
    if mode == "tf.function":
        return tf.function
    if mode == "janus":
        return janus.function
    raise ValueError(f"unknown mode {mode!r}: use eager, tf.function or janus")


def run(prog: Program, mode: str, wrap=None) -> Outcome:
    namespace = instantiate(prog)
    buffer = io.StringIO()
    outcome = Outcome()
    made = []
    if wrap is None and mode == "janus":
        from tfweave import janus

        def wrap(fn):
            made.append(janus.function(fn))
            return made[-1]
    try:
        with contextlib.redirect_stdout(buffer):
            outcome.results = namespace["driver"](wrap or wrapper(mode))
            outcome.state = namespace["state"]()
    except Exception as error:  # the table records it: this is what tf.function does here
        outcome.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}" \
            if str(error).strip() else type(error).__name__
    outcome.stdout = buffer.getvalue()
    if made:
        stats = [m.stats() for m in made]
        outcome.janus_stats = {k: sum(s[k] for s in stats) for k in
                               ("calls", "graph_calls", "eager_calls", "traces", "deopts")}
        outcome.janus_stats["eager_reason"] = next(
            (s["eager_reason"] for s in stats if s["eager_reason"]), None)
    return outcome


_NUMBER = re.compile(r"-?\d+\.?\d*(?:e[-+]?\d+)?")


def differences(a: Outcome, b: Outcome) -> list[str]:
    """Where two outcomes disagree (values within float tolerance count as equal)."""
    out = []
    if (a.error is None) != (b.error is None):
        out.append(f"error: {a.error} vs {b.error}")
        return out
    _diff(a.results, b.results, "results", out)
    _diff(a.state, b.state, "state", out)
    text_a, text_b = _NUMBER.sub("#", a.stdout), _NUMBER.sub("#", b.stdout)
    nums_a, nums_b = _NUMBER.findall(a.stdout), _NUMBER.findall(b.stdout)
    if text_a != text_b or len(nums_a) != len(nums_b) or any(
            not math.isclose(float(x), float(y), rel_tol=1e-4, abs_tol=1e-5)
            for x, y in zip(nums_a, nums_b)):
        out.append(f"stdout: {a.stdout!r} vs {b.stdout!r}")
    return out


def _diff(x, y, where, out):
    import numpy as np
    import tensorflow as tf
    if isinstance(x, tf.Variable):
        x = x.numpy()
    if isinstance(y, tf.Variable):
        y = y.numpy()
    if isinstance(x, tf.Tensor) or isinstance(y, tf.Tensor):
        if not (isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor)):
            out.append(f"{where}: {type(x).__name__} vs {type(y).__name__}")
            return
        if x.dtype != y.dtype:
            out.append(f"{where}: dtype {x.dtype.name} vs {y.dtype.name}")
            return
        try:
            x, y = x.numpy(), y.numpy()
        except AttributeError:  # a graph tensor that leaked out of a trace (tf.function)
            out.append(f"{where}: a symbolic tensor leaked out of a trace")
            return
    if isinstance(x, (np.ndarray, np.generic)) or isinstance(y, (np.ndarray, np.generic)):
        if type(x) is not type(y) or np.shape(x) != np.shape(y) or not np.allclose(
                x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
            out.append(f"{where}: {x!r} vs {y!r}")
        return
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if type(x) is not type(y) or len(x) != len(y):
            out.append(f"{where}: {type(x).__name__}[{len(x)}] vs {type(y).__name__}[{len(y)}]")
            return
        for i, (p, q) in enumerate(zip(x, y)):
            _diff(p, q, f"{where}[{i}]", out)
        return
    if isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            out.append(f"{where}: keys {list(x)} vs {list(y)}")
            return
        for key in x:
            _diff(x[key], y[key], f"{where}[{key!r}]", out)
        return
    if type(x) is not type(y):
        out.append(f"{where}: {type(x).__name__} {x!r} vs {type(y).__name__} {y!r}")
    elif isinstance(x, float):
        if not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6):
            out.append(f"{where}: {x!r} vs {y!r}")
    elif isinstance(x, (int, str, bool, bytes, type(None))):
        if x != y:
            out.append(f"{where}: {x!r} vs {y!r}")


def verdict(reference: Outcome, candidate: Outcome) -> str:
    if candidate.error is not None and reference.error is None:
        return "error"
    return "same" if not differences(reference, candidate) else "wrong"


def table(programs=None) -> str:
    """Markdown: for each program, what tf.function and @janus.function do next to eager."""
    programs = programs or PROGRAMS
    rows = ["| program | area | what it does | tf.function | janus |", "|---|---|---|---|---|"]
    for prog in programs:
        eager = run(prog, "eager")
        tf_fn = verdict(eager, run(prog, "tf.function"))
        jan = verdict(eager, run(prog, "janus"))
        rows.append(f"| {prog.name} | {prog.area} | {prog.what} | {tf_fn} | {jan} |")
    counts = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.split("|")]
        counts.setdefault("tf.function", []).append(cells[4])
        counts.setdefault("janus", []).append(cells[5])
    summary = ", ".join(
        f"{mode}: " + " / ".join(f"{v.count(k)} {k}" for k in ("same", "wrong", "error"))
        for mode, v in counts.items())
    return "\n".join(rows) + f"\n\n{len(programs)} programs; {summary}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfweave.janus.corpus", description=__doc__)
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    parser.add_argument("--only", action="append", default=[], help="program names to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    programs = [p for p in PROGRAMS if not args.only or p.name in args.only]
    if args.table:
        print(table(programs))
        return 0
    failed = 0
    for prog in programs:
        jan = run(prog, "janus")
        diffs = differences(run(prog, "eager"), jan)
        st = jan.janus_stats or {}
        print(f"{prog.name:<28} {'same' if not diffs else 'DIFFERENT: ' + '; '.join(diffs)[:300]}"
              f"  [graph {st.get('graph_calls')}/{st.get('calls')} calls, {st.get('traces')} "
              f"traces, {st.get('deopts')} deopts{', eager: ' + st['eager_reason'][:90] if st.get('eager_reason') else ''}]")
        failed += bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
