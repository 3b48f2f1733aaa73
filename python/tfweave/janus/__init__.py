"""tfweave.janus: run unmodified imperative TensorFlow code as speculative graphs (JANUS).

    from tfweave import janus

    @janus.function
    def step(x):
        ...
    print(janus.explain(step))
"""

from tfweave.janus.speculation import JanusFunction, explain, function

__all__ = ["function", "explain", "JanusFunction"]
