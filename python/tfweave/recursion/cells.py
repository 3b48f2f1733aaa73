"""The per-node computations of TreeRNN, RNTN and binary TreeLSTM, shared by every executor.

A cell owns the weights and two functions on row vectors ([1, H]): ``leaf(token)`` gives a
leaf's state from its token, ``combine(left, right)`` a parent's from its children's. A state
is a tuple of [1, H] tensors (``(h,)``, or ``(h, c)`` for the LSTM) whose first entry is the
node's representation. The recursive model, the iterative (while-loop) baseline and the eager
Python recursion all call these same functions, so they compute the same numbers.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class TreeCell(keras.layers.Layer):
    """Base: embedding of leaf tokens, and the state layout."""

    state_size = 1

    def __init__(self, vocabulary_size: int, hidden: int, *, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = int(vocabulary_size)
        self.hidden = int(hidden)
        self.seed = seed
        self.embedding = self.add_weight(
            name="embedding", shape=(self.vocabulary_size, self.hidden),
            initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=seed))

    def embed(self, token):
        return tf.reshape(tf.gather(self.embedding, token), [1, self.hidden])

    def state_specs(self) -> tuple:
        return tuple(tf.TensorSpec([1, self.hidden], tf.float32) for _ in range(self.state_size))

    def leaf(self, token) -> tuple:
        raise NotImplementedError

    def combine(self, left: tuple, right: tuple) -> tuple:
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "vocabulary_size": self.vocabulary_size,
                "hidden": self.hidden, "seed": self.seed}


class TreeRNNCell(TreeCell):
    """Socher et al.'s recursive network: h = tanh(W [h_l; h_r] + b), leaves h = tanh(E x)."""

    def __init__(self, vocabulary_size: int, hidden: int, **kwargs):
        super().__init__(vocabulary_size, hidden, **kwargs)
        init = keras.initializers.GlorotUniform(seed=self.seed + 1)
        self.w = self.add_weight(name="w", shape=(2 * hidden, hidden), initializer=init)
        self.b = self.add_weight(name="b", shape=(hidden,), initializer="zeros")

    def leaf(self, token):
        return (tf.tanh(self.embed(token)),)

    def combine(self, left, right):
        both = tf.concat([left[0], right[0]], axis=1)
        return (tf.tanh(tf.matmul(both, self.w) + self.b),)


class RNTNCell(TreeRNNCell):
    """Socher et al.'s recursive neural tensor network: adds a bilinear term [h_l; h_r]^T V."""

    def __init__(self, vocabulary_size: int, hidden: int, **kwargs):
        super().__init__(vocabulary_size, hidden, **kwargs)
        init = keras.initializers.RandomNormal(stddev=0.01, seed=self.seed + 2)
        self.v = self.add_weight(name="v", shape=(2 * hidden, 2 * hidden * hidden),
                                 initializer=init)

    def combine(self, left, right):
        both = tf.concat([left[0], right[0]], axis=1)                      # [1, 2H]
        bilinear = tf.reshape(tf.matmul(both, self.v), [2 * self.hidden, self.hidden])
        tensor_term = tf.matmul(both, bilinear)                            # [1, H]
        return (tf.tanh(tensor_term + tf.matmul(both, self.w) + self.b),)


class TreeLSTMCell(TreeCell):
    """Tai et al.'s binary (N-ary, N=2) Tree-LSTM, with a forget gate per child.

    Leaves: i, o, u from the token embedding; c = i * u, h = o * tanh(c).
    Parents: i, f_l, f_r, o, u from [h_l; h_r]; c = i * u + f_l * c_l + f_r * c_r.
    """

    state_size = 2

    def __init__(self, vocabulary_size: int, hidden: int, **kwargs):
        super().__init__(vocabulary_size, hidden, **kwargs)
        h = hidden
        self.w_leaf = self.add_weight(name="w_leaf", shape=(h, 3 * h),
                                      initializer=keras.initializers.GlorotUniform(self.seed + 1))
        self.b_leaf = self.add_weight(name="b_leaf", shape=(3 * h,), initializer="zeros")
        self.u = self.add_weight(name="u", shape=(2 * h, 5 * h),
                                 initializer=keras.initializers.GlorotUniform(self.seed + 2))
        self.b = self.add_weight(name="b", shape=(5 * h,), initializer="zeros")

    def leaf(self, token):
        gates = tf.matmul(self.embed(token), self.w_leaf) + self.b_leaf
        i, o, u = tf.split(gates, 3, axis=1)
        c = tf.sigmoid(i) * tf.tanh(u)
        return (tf.sigmoid(o) * tf.tanh(c), c)

    def combine(self, left, right):
        gates = tf.matmul(tf.concat([left[0], right[0]], axis=1), self.u) + self.b
        i, f_left, f_right, o, u = tf.split(gates, 5, axis=1)
        c = (tf.sigmoid(i) * tf.tanh(u) + tf.sigmoid(f_left) * left[1]
             + tf.sigmoid(f_right) * right[1])
        return (tf.sigmoid(o) * tf.tanh(c), c)


CELLS = {"treernn": TreeRNNCell, "rntn": RNTNCell, "treelstm": TreeLSTMCell}
