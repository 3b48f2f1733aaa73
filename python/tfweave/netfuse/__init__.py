"""tfweave.netfuse: merge N models of one architecture (different weights) into one model.

The merge is a graph pass over the members' frozen serving graphs: it checks they are the same
graph up to their weights, stacks the N weight sets, and lifts every op over a model axis
(MatMul -> BatchMatMulV2, Conv2D -> one grouped Conv2D, Gather -> offset lookup in one table,
...). The result is a SavedModel of stock TensorFlow ops that serves all N members in one run.
``merge(..., mode="grouped")`` runs the projections as tfweave's GroupedMatMul instead (faster
on CPUs at small batches; the op library must be loaded where the model is served),
``mode="ragged"`` adds a signature for per-member batch sizes without padding, and
``jit_compile=True`` has XLA compile the stock merge's graph (stock ops still; TF Serving
runs it with ``--xla_cpu_compilation_enabled=true``).

    from tfweave import netfuse
    merged = netfuse.merge(["ft_a/1", "ft_b/1", "ft_c/1"], "merged/1")
    merged.run({"ft_a": {"image": x_a}, "ft_c": {"image": x_c}})
    netfuse.load_merged("merged/1")
"""

from tfweave.netfuse.errors import MergeError, NotIsomorphicError, UnsupportedOpError
from tfweave.netfuse.lifting import supported_ops
from tfweave.netfuse.merged_model import MergedModel, load_merged, merge

__all__ = ["merge", "load_merged", "MergedModel", "MergeError", "NotIsomorphicError",
           "UnsupportedOpError", "supported_ops"]
