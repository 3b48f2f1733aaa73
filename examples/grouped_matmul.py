"""Per-group weights on ragged rows with tfweave's GroupedMatMul (build the ops first:
`python -m tfweave.ops.build`).

Three "models" share one call: model g multiplies its own rows by its own weight w[g].
"""

import numpy as np
import tensorflow as tf

from tfweave.ops.grouped_matmul import grouped_matmul

group_sizes = tf.constant([2, 0, 3])               # model 1 has no rows this time
x = tf.random.normal([5, 4])                       # rows of all models, model after model
w = tf.Variable(tf.random.normal([3, 4, 6]))       # one [K, M] weight per model
bias = tf.Variable(tf.zeros([3, 6]))

with tf.GradientTape() as tape:
    y = grouped_matmul(x, w, group_sizes, bias=bias)   # [5, 6]
    loss = tf.reduce_sum(y ** 2)
dw, dbias = tape.gradient(loss, [w, bias])

# The same rows, one model at a time:
reference = tf.concat([tf.matmul(part, w[g]) for g, part in
                       enumerate(tf.split(x, group_sizes))], axis=0)
print("max |grouped - per-model|:", float(tf.reduce_max(tf.abs(y - reference))))
print("gradient of the idle model's weight is zero:", not np.any(dw[1].numpy()))

# In tf.function (not jit_compile=True: XLA does not know the op).
serve = tf.function(lambda x, sizes: grouped_matmul(x, w, sizes, bias=bias))
print("tf.function output shape:", serve(x, group_sizes).shape)
