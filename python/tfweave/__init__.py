"""tfweave: TensorFlow 2 plugins that share work TensorFlow repeats.

Parts (import the one you use; none is imported here, so ``import tfweave`` stays light):

- ``tfweave.netfuse``: merge N fine-tuned SavedModels into one merged SavedModel.
- ``tfweave.hippo``: stage-tree hyper-parameter optimization for KerasTuner.
- ``tfweave.janus``: ``@janus.function``, speculative graph execution of imperative code.
- ``tfweave.recursion``: recursive TF functions on the ``Invoke`` op.
"""

__version__ = "0.1.0"
