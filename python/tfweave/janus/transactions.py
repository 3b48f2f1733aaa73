"""All-or-nothing variable state for graphs that assert after they write (issue #10).

A speculative graph may check an assumption (an in-graph guard) after it has already written a
variable: a training step that branches on the loss after ``apply_gradients``. If the assertion
fails, the call must leave no trace, so the graph never touches the user's variables directly:

* Every variable the traced graph writes gets a *shadow* ``tf.Variable`` of the same dtype and
  shape. The graph is called with the shadows' handles in place of the originals' captured
  handles, so all its reads and writes (optimizer slots and iterations included) go to the
  shadows, in program order, with read-after-write intact.
* The *transaction* graph copies originals into shadows, calls the speculative graph, and then
  copies shadows back into the originals. The copy-back runs after the call op (automatic control
  dependencies on the shadow resources), so when an assertion inside fails the whole run aborts
  before anything is committed.
* Under XLA (``split=True``) Assert is a no-op, so the guards are boolean outputs: begin (copy
  in), run the compiled graph, check the guards on the host, and only then commit.

Copies are cheap: TF variables are copy-on-write, so copying in aliases the buffer and the first
in-place update pays one copy, as the write itself would have to.
"""

from __future__ import annotations

import tensorflow as tf

# Ops that only read a resource; any other consumer of a captured variable handle may write it.
_READ_ONLY_CONSUMERS = frozenset({"ReadVariableOp", "VariableShape", "VarIsInitializedOp"})


class NotTransactional(Exception):
    """The graph writes state that cannot be shadowed; the message says which."""


class HostGuardFailed(Exception):
    """An XLA graph returned False for an in-graph guard; nothing was committed."""

    def __init__(self, guard_id: int):
        super().__init__(f"guard {guard_id} failed")
        self.guard_id = guard_id


def written_captures(concrete) -> list[int]:
    """Indices into ``concrete.captured_inputs`` of resources the graph may write."""
    internal = {id(inner): index for index, (_, inner) in enumerate(concrete.graph.captures)}
    external = list(concrete.captured_inputs)
    written = set()
    for op in concrete.graph.get_operations():
        if op.type in _READ_ONLY_CONSUMERS:
            continue
        for tensor in op.inputs:
            if tensor.dtype == tf.resource and id(tensor) in internal:
                written.add(internal[id(tensor)])
    if len(external) != len(concrete.graph.captures):
        raise NotTransactional("the graph's captured inputs could not be matched to its "
                               "placeholders, so its writes cannot be redirected to shadows")
    return sorted(written)


class Transaction:
    """Runs ``concrete`` on shadow variables and commits them only when it succeeded."""

    def __init__(self, concrete, n_inputs: int, split: bool = False, guard_outputs=()):
        self.concrete = concrete
        self.split = split
        self.guard_outputs = list(guard_outputs)
        captures = list(concrete.captured_inputs)
        by_handle = {}
        for variable in concrete.graph.variables:
            by_handle[id(variable.handle)] = variable
        self.originals, self.shadows = [], []
        self.substituted = list(captures)
        for index in written_captures(concrete):
            variable = by_handle.get(id(captures[index]))
            if variable is None:
                raise NotTransactional(
                    "the graph writes a resource that is not a tf.Variable (a table, iterator or "
                    "queue), so it cannot be rolled back if an in-graph guard fails")
            with tf.init_scope():
                shadow = tf.Variable(variable.read_value(), trainable=False,
                                     name="janus_shadow", shape=variable.shape)
            self.originals.append(variable)
            self.shadows.append(shadow)
            self.substituted[index] = shadow.handle
        signature = [tf.TensorSpec(t.shape, t.dtype) for t in concrete.inputs[:n_inputs]]
        originals, shadows = self.originals, self.shadows

        def begin():
            for original, shadow in zip(originals, shadows):
                shadow.assign(original.read_value())
            return []

        def commit():
            for original, shadow in zip(originals, shadows):
                original.assign(shadow.read_value())
            return []

        def transaction(*flat):
            begin()
            outputs = concrete._call_flat(list(flat), self.substituted)  # pylint: disable=protected-access
            # The reads of the shadows come after the call op (same resources), and the call op
            # fails as a whole when an assertion inside it does: nothing is committed then.
            commit()
            return outputs

        if split:
            self._begin = tf.function(begin, autograph=False).get_concrete_function()
            self._commit = tf.function(commit, autograph=False).get_concrete_function()
        else:
            self._whole = tf.function(transaction, input_signature=signature,
                                      autograph=False).get_concrete_function()

    def run(self, flat):
        if not self.split:
            return self._whole(*flat)
        self._begin()
        outputs = self.concrete._call_flat(flat, self.substituted)  # pylint: disable=protected-access
        for guard_id, index in self.guard_outputs:
            if not bool(outputs[index]):
                raise HostGuardFailed(guard_id)
        self._commit()
        return outputs


def describe(transaction: Transaction, jit_compile: bool) -> str:
    names = sorted({v.name for v in transaction.originals})
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    where = ("XLA returns the in-graph guards as outputs, checked on the host before committing"
             if jit_compile else "committed after every in-graph assertion held")
    return (f"writes {len(names)} variable(s) through shadow copies ({shown}); {where}")
