"""tfweave.recursion: TensorFlow functions that call themselves (the Invoke op).

    from tfweave import recursion

    @recursion.function(input_signature=[tf.TensorSpec([], tf.int32)],
                        output_signature=tf.TensorSpec([], tf.int32))
    def fib(n):
        return tf.cond(n < 2, lambda: n, lambda: fib(n - 1) + fib(n - 2))
"""

from tfweave.recursion.recursive_function import (RecursionDefinitionError, RecursiveFunction,
                                                   function)

__all__ = ["function", "RecursiveFunction", "RecursionDefinitionError"]
