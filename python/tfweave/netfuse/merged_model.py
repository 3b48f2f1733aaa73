"""Building, saving and loading a merged SavedModel.

On-disk contract (the ``tfweave serve`` part relies on it):

- signature ``serving_default`` takes member i's input ``x`` as ``m{i}_x`` and returns its output
  ``y`` as ``m{i}_y`` (or, with ``stacked=True``, one ``[N, B, ...]`` tensor per name). The
  other form is always saved too, under signature ``prefixed`` / ``stacked``.
- Members may send different batch sizes in the prefixed form: inputs are zero-padded to the
  largest batch, run as one ``[N, B_max, ...]`` batch, and each output is sliced back to its
  member's batch (members with an empty batch cost only their padding). A member's inputs
  share one batch size. Where an output combines a member's rows (``unpadded_outputs``: no
  batch axis, or rows that depend on the other rows), members must send equal batches or none.
- ``assets/netfuse.json``: ``{"format": 1, "members": [{"name", "source", "index"}],
  "inputs": {name: {"dtype", "shape"}}, "outputs": {...}, "unpadded_outputs": [name],
  "signatures": {...}, "mode": ..., "jit_compile": bool}`` (``jit_compile`` absent in models
  merged before it existed: false).
- Stock TensorFlow ops only (mode ``"stock"``), so an unmodified TF Serving loads it (with
  ``jit_compile``, one function is marked for XLA: TF Serving needs
  ``--xla_cpu_compilation_enabled=true``). Modes ``"ragged"`` and ``"grouped"`` use tfweave's
  GroupedMatMul op (``op_libraries`` names it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from typing import Callable, Iterable

import numpy as np

from tfweave.netfuse.errors import MergeError

LOG = logging.getLogger("tfweave.netfuse")
FORMAT_VERSION = 1
METADATA_FILE = "netfuse.json"
MODES = ("stock", "ragged", "grouped")


def prefixed_name(index: int, name: str) -> str:
    return f"m{index}_{name}"


def fixed_batch(shape) -> int | None:
    """The batch size an input's shape fixes (``keras.Input(batch_size=...)``), or None."""
    return shape[0] if shape and shape[0] is not None else None


def _fixed_batch_message(name: str, fixed: int) -> str:
    return (f"input '{name}' has a fixed batch size of {fixed} (the members were exported "
            f"with it): send {fixed} rows, or none to leave the member out")


def unbatched_outputs(inputs: dict, outputs: dict) -> list[str]:
    """Outputs (name -> {"shape"}) whose first axis is not their member's batch: a scalar,
    or a fixed first dimension where the inputs' batch is open (a column sum, a total, a row
    count). Computed on padded rows they would be wrong, so members with such outputs run
    unpadded: each sends the same number of rows, or none (see also row_mixing_outputs)."""
    if any(fixed_batch(spec["shape"]) is not None for spec in inputs.values()):
        return []  # every member sends the fixed batch or none: never padded
    return [name for name, spec in outputs.items()
            if spec["shape"] is not None and (not spec["shape"] or spec["shape"][0] is not None)]


def row_mixing_outputs(member) -> list[str]:
    """Outputs with a batch axis whose rows depend on the other rows (centred by the batch
    mean, an in-batch similarity [B, B]): padding would change them. Found by running the
    member on two synthetic rows and on the first alone; none when no synthetic input is
    safe (strings, a fixed batch) or the run fails."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    feeds = {}
    for info in member.inputs:
        dtype = tf.as_dtype(info.dtype)
        if not info.shape or fixed_batch(info.shape) is not None:
            return []
        shape = [2] + [3 if d is None else d for d in info.shape[1:]]
        if dtype.is_floating:
            value = rng.normal(size=shape)
        elif dtype.is_integer or dtype.is_bool:
            value = rng.integers(0, 2, size=shape)  # ids 0 and 1 are in any vocabulary
        else:
            return []
        feeds[info.tensor] = value.astype(dtype.as_numpy_dtype)
    fetches = [info.tensor for info in member.outputs]
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(member.graph_def, name="")
    try:
        with tf.compat.v1.Session(graph=graph) as session:
            both = session.run(fetches, feeds)
            first = session.run(fetches, {k: v[:1] for k, v in feeds.items()})
    except (tf.errors.OpError, ValueError) as error:
        LOG.info("row probe skipped: %s", str(error).splitlines()[0])
        return []
    mixing = []
    for info, rows, row in zip(member.outputs, both, first):
        if np.ndim(rows) == 0 or len(rows) != 2:
            continue  # no batch axis: unbatched_outputs
        if rows.shape[1:] != row.shape[1:] or not np.allclose(
                rows[:1].astype(np.float64), row.astype(np.float64), rtol=1e-3, atol=1e-4,
                equal_nan=True):
            mixing.append(info.name)
    return mixing


def _unpadded_message(names: list[str]) -> str:
    return (f"output {', '.join(map(repr, names))} combines a member's rows (it has no batch "
            f"axis, or its rows depend on the other rows), so it cannot be computed on padded "
            f"rows: send every member the same number of rows, or none")


class MergedModel:
    """N member models behind one merged graph, in memory or loaded from disk.

    ``model.run({member: {input_name: array}})`` runs any subset of members, each with its own
    batch size, and returns ``{member: {output_name: array}}`` (members by name or index).
    """

    def __init__(self, metadata: dict, signatures: dict, keep_alive=None, path: str | None = None):
        """``signatures``: "prefixed"/"stacked" -> callable taking and returning a dict."""
        self.metadata = metadata
        self.signatures = signatures
        self.path = path
        self._keep_alive = keep_alive  # the module owning the variables
        self.functions: dict = {}  # in-memory merges: signature name -> ConcreteFunction
        self.members = [m["name"] for m in metadata["members"]]
        self.input_specs = metadata["inputs"]
        self.output_specs = metadata["outputs"]
        self.unpadded_outputs = metadata.get(
            "unpadded_outputs", unbatched_outputs(self.input_specs, self.output_specs))

    @property
    def variables(self) -> tuple:
        """The merged model's weight variables (every member's, stacked as the graph reads
        them), in memory or loaded; empty for a model without weights."""
        import tensorflow as tf
        weights = getattr(self._keep_alive, "merged_weights", None)
        return tuple(v for v in tf.nest.flatten(weights) if isinstance(v, tf.Variable))

    @property
    def num_members(self) -> int:
        return len(self.members)

    def _index(self, member) -> int:
        if isinstance(member, (int, np.integer)):
            if not 0 <= int(member) < self.num_members:
                raise KeyError(f"member index {member} out of range 0..{self.num_members - 1}")
            return int(member)
        if member not in self.members:
            raise KeyError(f"no member named {member!r}; members: {self.members}")
        return self.members.index(member)

    def run(self, requests: dict) -> dict:
        """Runs the members named in ``requests`` (others get an empty batch)."""
        import tensorflow as tf
        if not requests:
            return {}
        indices = {self._index(k): k for k in requests}
        template = {}
        feeds = {}
        batches = set()
        for index, key in indices.items():
            given = requests[key]
            missing = set(self.input_specs) - set(given)
            if missing:
                raise MergeError(f"member {self.members[index]}: missing inputs {sorted(missing)}"
                                 f" (expects {sorted(self.input_specs)})")
            rows = {name: np.shape(given[name])[0] for name in self.input_specs
                    if np.ndim(given[name])}
            if len(set(rows.values())) > 1:
                # the signature splits all inputs by one batch size per member
                raise MergeError(f"member {self.members[index]}: its inputs must have the same "
                                 f"number of rows, but " + ", ".join(
                                     f"'{name}' has {count} rows" for name, count in rows.items()))
            batches.update(count for count in rows.values() if count)
            for name, spec in self.input_specs.items():
                array = np.asarray(given[name], dtype=spec["dtype"])
                fixed = fixed_batch(spec["shape"])
                if fixed is not None and array.ndim and array.shape[0] not in (0, fixed):
                    raise MergeError(f"member {self.members[index]}: "
                                     f"{_fixed_batch_message(name, fixed)}, not "
                                     f"{array.shape[0]}")
                feeds[prefixed_name(index, name)] = array
                first, like = template.setdefault(name, (index, array))
                if like.shape[1:] != array.shape[1:]:
                    # the members' rows are stacked into one batch
                    raise MergeError(
                        f"input '{name}': member {self.members[first]} sent rows of shape "
                        f"{list(like.shape[1:])}, member {self.members[index]} rows of shape "
                        f"{list(array.shape[1:])}; members run as one batch, so pad their "
                        f"inputs to one shape (with a mask, if the model takes one) or run "
                        f"them in separate calls")
        if self.unpadded_outputs and len(batches) > 1:
            raise MergeError(f"{_unpadded_message(self.unpadded_outputs)} (rows sent: "
                             f"{sorted(batches)})")
        for index in range(self.num_members):
            if index in indices:
                continue
            for name, spec in self.input_specs.items():
                _, like = template[name]
                feeds[prefixed_name(index, name)] = np.zeros((0,) + like.shape[1:], like.dtype)
        results = self.signatures["prefixed"]({k: tf.constant(v) for k, v in feeds.items()})
        return {key: {name: results[prefixed_name(index, name)].numpy()
                      for name in self.output_specs}
                for index, key in indices.items()}

    def run_stacked(self, inputs: dict) -> dict:
        """``{input_name: [N, B, ...]}`` -> ``{output_name: [N, B, ...]}``."""
        import tensorflow as tf
        results = self.signatures["stacked"]({k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in results.items()}

    def run_ragged(self, inputs: dict, group_sizes) -> dict:
        """Ragged mode: ``{input_name: rows of all members}`` and ``group_sizes`` ``[N]``."""
        import tensorflow as tf
        if "ragged" not in self.signatures:
            raise MergeError("this merged model was not merged with mode='ragged'")
        feeds = {k: tf.constant(v) for k, v in inputs.items()}
        feeds["group_sizes"] = tf.constant(group_sizes, tf.int32)
        return {k: v.numpy() for k, v in self.signatures["ragged"](feeds).items()}

    def __call__(self, requests: dict) -> dict:
        return self.run(requests)


def load_merged(path: str) -> MergedModel:
    """Loads a merged SavedModel written by :func:`tfweave.netfuse.merge`."""
    import tensorflow as tf
    meta_path = os.path.join(path, "assets", METADATA_FILE)
    if not os.path.exists(meta_path):
        raise MergeError(f"{path} is not a merged SavedModel ({meta_path} is missing); merge "
                         f"models with `tfweave merge` first")
    with open(meta_path) as handle:
        metadata = json.load(handle)
    if metadata.get("format") != FORMAT_VERSION:
        raise MergeError(f"{meta_path}: format {metadata.get('format')} is not supported "
                         f"(this tfweave reads format {FORMAT_VERSION})")
    if metadata.get("mode") == "ragged" or "grouped_matmul" in metadata.get("op_libraries", []):
        load_ragged_ops()
    loaded = tf.saved_model.load(path)
    callers = {key: (lambda feeds, fn=loaded.signatures[key]: fn(**feeds))
               for key in loaded.signatures if key != "serving_default"}
    return MergedModel(metadata, callers, keep_alive=loaded, path=path)


def _input_specs(reference, num_members: int, stacked: bool):
    import tensorflow as tf
    specs = []
    if stacked:
        for info in reference.inputs:
            shape = [num_members] + (info.shape if info.shape is not None else [])
            specs.append(tf.TensorSpec(shape, tf.as_dtype(info.dtype), name=info.name))
        return specs
    for index in range(num_members):
        for info in reference.inputs:
            shape = info.shape
            if fixed_batch(shape) is not None:
                # open, so that a member left out can send an empty batch; the body checks
                # that the others send the fixed size (see _checked_batches)
                shape = [None] + shape[1:]
            specs.append(tf.TensorSpec(shape, tf.as_dtype(info.dtype),
                                       name=prefixed_name(index, info.name)))
    return specs


def _checked(value, condition, data, summarize=None):
    """``value``, once the graph has asserted ``condition`` (else InvalidArgumentError with
    ``data``): the checks below guard the members' rows before they are stacked or split."""
    import tensorflow as tf
    with tf.control_dependencies([tf.debugging.Assert(condition, data, summarize=summarize)]):
        return tf.identity(value)


def _checked_batches(per_member, input_names, input_shapes):
    """The members' input tensors, those with a fixed batch size checked at run time to have
    it or none: padding a smaller batch to the fixed size would mix in another member's rows."""
    import tensorflow as tf
    checked = []
    for index, member in enumerate(per_member):
        tensors = []
        for name, tensor in zip(input_names, member):
            fixed = fixed_batch(input_shapes[name])
            if fixed is not None:
                rows = tf.shape(tensor)[0]
                tensor = _checked(
                    tensor, tf.logical_or(tf.equal(rows, 0), tf.equal(rows, fixed)),
                    [_fixed_batch_message(prefixed_name(index, name), fixed) + "; rows sent:",
                     rows])
            tensors.append(tensor)
        checked.append(tensors)
    return checked


def _member_sizes(per_member, input_names):
    """Each member's batch size ``[N]``, checked at run time to be that of every one of its
    inputs: all inputs are split by these sizes, so a member sending 2 rows of one input and 3
    of another would hand its extra row to the next member."""
    import tensorflow as tf
    rows = tf.stack([tf.stack(tf.shape_n([member[p] for member in per_member]))[:, 0]
                     for p in range(len(input_names))], axis=1)                  # [N, inputs]
    sizes = rows[:, 0]
    if len(input_names) == 1:
        return sizes
    return _checked(
        sizes, tf.reduce_all(tf.equal(rows, sizes[:, None])),
        [f"each member's inputs must have the same number of rows; rows of "
         f"{', '.join(input_names)} per member:", rows],
        summarize=len(per_member) * len(input_names))


def _checked_unpadded(sizes, biggest, unpadded):
    """``sizes``, checked at run time to need no padding (each 0 or ``biggest``) when an
    output combines rows (see unbatched_outputs, row_mixing_outputs)."""
    import tensorflow as tf
    if not unpadded:
        return sizes
    return _checked(
        sizes, tf.reduce_all(tf.logical_or(tf.equal(sizes, 0), tf.equal(sizes, biggest))),
        [_unpadded_message(unpadded) + "; rows sent per member:", sizes])


def build_signature_functions(plan, lifter_factory, num_members: int, unpadded=(),
                              jit_compile: bool = False):
    """The two serving bodies as Python callables over positional tensors. ``unpadded``:
    outputs that combine rows, so members must send equal batches (or none).
    ``jit_compile``: the lifted graph runs as one XLA-compiled function (see netfuse.xla)."""
    import tensorflow as tf
    from tfweave.netfuse.lifting import MEMBERS, STACKED, Value, lift

    reference = plan.reference
    input_names = [info.name for info in reference.inputs]
    output_names = [info.name for info in reference.outputs]

    def lifted(*tensors, origins=None):
        """The merged graph on stacked ``[N, B, ...]`` inputs: {output name: [N, B, ...]}.
        ``origins``: filled with lifted op name -> member node name."""
        lifter = lifter_factory()
        lifter.origins = origins
        values = {name: Value(STACKED, t) for name, t in zip(input_names, tensors)}
        outputs = lift(plan, lifter, values)
        return {name: lifter.stacked(outputs[name]) for name in output_names}

    if jit_compile:
        from tfweave.netfuse.xla import compiled_core
        lifted = compiled_core(lifted, output_names)

    def stacked_body(*tensors):
        outputs = lifted(*tensors)
        return {name: tf.identity(outputs[name], name=name) for name in output_names}

    input_shapes = {info.name: info.shape for info in reference.inputs}
    unbatched = unbatched_outputs(
        {info.name: {"shape": info.shape} for info in reference.inputs},
        {info.name: {"shape": info.shape} for info in reference.outputs})

    def prefixed_body(*tensors):
        # Members' batches differ: rows are gathered into a zero-padded [N, B_max, ...] batch
        # and gathered back out, with a number of ops that does not grow with N (per-member
        # pad/slice ops cost more than the model itself at N=32, batch 1).
        k = len(input_names)
        per_member = _checked_batches([tensors[i * k:(i + 1) * k] for i in range(num_members)],
                                      input_names, input_shapes)
        if num_members == 1 and not jit_compile:
            lifter = lifter_factory()
            values = {name: Value(MEMBERS, members=[t])
                      for name, t in zip(input_names, per_member[0])}
            outputs = lift(plan, lifter, values)
            return {prefixed_name(0, name): tf.identity(lifter.stacked(outputs[name])[0],
                                                        name=prefixed_name(0, name))
                    for name in output_names}
        sizes = _member_sizes(per_member, input_names)
        # a fixed batch is the members' only size (or none): the graph may depend on it
        fixed_rows = fixed_batch(input_shapes[input_names[0]])
        biggest = fixed_rows or tf.reduce_max(sizes)
        sizes = _checked_unpadded(sizes, biggest, list(unpadded))
        total = tf.reduce_sum(sizes)
        offsets = tf.cumsum(sizes, exclusive=True)
        position = tf.range(biggest)
        valid = position[None, :] < sizes[:, None]                       # [N, B_max]
        source_row = tf.where(valid, offsets[:, None] + position[None, :], total)
        values = {}
        for p, name in enumerate(input_names):
            parts = [member[p] for member in per_member]
            zero_row = tf.zeros(tf.concat([[1], tf.shape(parts[0])[1:]], 0), parts[0].dtype)
            padded = tf.gather(tf.concat(parts + [zero_row], 0), source_row)
            shape = input_shapes[name]
            if shape is not None:
                padded.set_shape([num_members, fixed_rows] + list(shape[1:]))
            values[name] = padded
        outputs = lifted(*[values[name] for name in input_names])
        real_rows = tf.reshape(tf.where(tf.reshape(valid, [-1])), [-1])
        result = {}
        for name in output_names:
            stacked = outputs[name]
            if stacked.shape.rank == 1 or name in unbatched:  # no batch axis to slice
                parts = tf.unstack(stacked, num=num_members)
            else:
                flat = tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], 0))
                parts = tf.split(tf.gather(flat, real_rows), sizes, num=num_members, axis=0)
            for index, part in enumerate(parts):
                key = prefixed_name(index, name)
                result[key] = tf.identity(part, name=key)
        return result

    return stacked_body, prefixed_body


def build_ragged_functions(plan, lifter_factory, num_members: int):
    """Ragged mode: ``ragged`` (rows of all members + group_sizes) and a ``prefixed`` body that
    concatenates the members' inputs instead of padding them."""
    import tensorflow as tf
    from tfweave.netfuse.ragged import ragged_outputs

    reference = plan.reference
    input_names = [info.name for info in reference.inputs]
    output_names = [info.name for info in reference.outputs]

    def ragged_body(*tensors):
        *rows, sizes = tensors
        outs = ragged_outputs(plan, lifter_factory(), input_names, output_names, rows, sizes)
        return {name: tf.identity(outs[name][0], name=name) for name in output_names}

    def prefixed_body(*tensors):
        k = len(input_names)
        per_member = [tensors[i * k:(i + 1) * k] for i in range(num_members)]
        sizes = _member_sizes(per_member, input_names)
        rows = [tf.concat([member[p] for member in per_member], 0) for p in range(k)]
        outs = ragged_outputs(plan, lifter_factory(), input_names, output_names, rows, sizes)
        result = {}
        for name in output_names:
            tensor, out_sizes = outs[name]
            for index, part in enumerate(tf.split(tensor, out_sizes, num=num_members, axis=0)):
                key = prefixed_name(index, name)
                result[key] = tf.identity(part, name=key)
        return result

    return ragged_body, prefixed_body


def _ragged_specs(reference, num_members: int):
    import tensorflow as tf
    specs = [tf.TensorSpec(info.shape, tf.as_dtype(info.dtype), name=info.name)
             for info in reference.inputs]
    return specs + [tf.TensorSpec([num_members], tf.int32, name="group_sizes")]


def load_ragged_ops():
    """The GroupedMatMul library ragged merged models need, loaded into this process."""
    from tfweave.netfuse.errors import MergeError as _MergeError
    try:
        from tfweave.ops.grouped_matmul import load_ops
        return load_ops()
    except ImportError as error:  # OpLibraryError is an ImportError
        raise _MergeError(f"mode='ragged' needs tfweave's grouped_matmul op library: {error}")


def build_module(plan, num_members: int, use_channels: bool = True,
                 conv_strategy: str = "grouped", mode: str = "stock", unpadded=(),
                 jit_compile: bool = False):
    """Traces the merged functions (twice: plan weights, then for real) into a tf.Module."""
    import tensorflow as tf
    from tfweave.netfuse.lifting import Lifter, WeightStore

    store = WeightStore()

    def make_lifter():
        return Lifter(num_members, store, use_channels=use_channels,
                      conv_strategy=conv_strategy,
                      grouped_matmul=mode in ("grouped", "ragged"))

    stacked_body, prefixed_body = build_signature_functions(plan, make_lifter, num_members,
                                                            unpadded, jit_compile=jit_compile)
    stacked_specs = _input_specs(plan.reference, num_members, stacked=True)
    prefixed_specs = _input_specs(plan.reference, num_members, stacked=False)

    bodies = {"stacked": (stacked_body, stacked_specs),
              "prefixed": (prefixed_body, prefixed_specs)}
    if mode == "ragged":
        ragged_body, prefixed_ragged = build_ragged_functions(plan, make_lifter, num_members)
        bodies["prefixed"] = (prefixed_ragged, prefixed_specs)
        bodies["ragged"] = (ragged_body, _ragged_specs(plan.reference, num_members))
    # Pass 1: find every weight the rules ask for, in the layout they ask for it.
    scratch = tf.Graph()
    with scratch.as_default():
        for body, specs in bodies.values():
            body(*[tf.compat.v1.placeholder(s.dtype, s.shape) for s in specs])
    del scratch
    module = tf.Module()
    module.merged_weights = store.create_variables()
    # Pass 2: the real functions, reading those variables. They are saved as signatures only
    # (not as module attributes, which tf.saved_model.save would trace once more).
    functions = {key: tf.function(body, input_signature=specs, autograph=False)
                 for key, (body, specs) in bodies.items()}
    concrete = {key: fn.get_concrete_function() for key, fn in functions.items()}
    # Both signatures are traced for good (fixed input signatures): drop the numpy copies of
    # the weights, which the variables now hold.
    plan.release()
    return module, concrete, store.nbytes()


def _tensor_specs_json(infos) -> dict:
    return {info.name: {"dtype": info.dtype, "shape": info.shape} for info in infos}


def save_merged(module, concrete: dict, metadata: dict, output_dir: str,
                overwrite: bool = False, warmup: bool = True) -> str:
    """Writes the SavedModel atomically: into a sibling temp folder, then renamed."""
    import tensorflow as tf
    output_dir = check_output_dir(output_dir, (), overwrite)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    # not tempfile.mkdtemp: its 0700 would survive the rename, and a server running as
    # another user could not read the model; os.mkdir honours the umask like the rest
    staging = os.path.join(parent, f".netfuse-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        default = "stacked" if metadata["stacked"] else "prefixed"
        signatures = dict(concrete)
        signatures["serving_default"] = concrete[default]
        tf.saved_model.save(module, staging, signatures=signatures)
        if warmup:
            write_warmup_requests(signatures, len(metadata["members"]), staging)
        os.makedirs(os.path.join(staging, "assets"), exist_ok=True)
        with open(os.path.join(staging, "assets", METADATA_FILE), "w") as handle:
            json.dump(metadata, handle, indent=1)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# The signatures a served merged model runs: TF Serving's default, and the one tfweave serve
# batches members' requests through in ragged mode.
WARMUP_SIGNATURES = ("serving_default", "ragged")


def write_warmup_requests(signatures: dict, num_members: int, export_dir: str) -> int:
    """Writes ``export_dir/assets.extra/tf_serving_warmup_requests`` (TF Serving's warmup
    file, which ``tfweave serve`` honours too): one Predict request per signature in
    WARMUP_SIGNATURES, one row per member, so that loading the model builds those graphs
    instead of the first request (about 0.5 s for 32 small encoders). Each request is run here
    first; a signature whose synthetic request cannot run (string inputs, a model that
    rejects zeros) gets none. Returns how many requests were written."""
    import tensorflow as tf

    from tfweave.serving import warmup

    logs = []
    for key in WARMUP_SIGNATURES:
        if key not in signatures:
            continue
        fn = signatures[key]
        # this module's signature functions take positional tensors whose specs carry the
        # SavedModel's input names
        positional = fn.structured_input_signature[0]
        specs = {spec.name: spec for spec in positional}
        feeds = _warmup_feeds(specs, num_members, ragged=key == "ragged")
        if feeds is None:
            LOG.info("no warmup request for signature %s: an input is a string or has no "
                     "known rank", key)
            continue
        try:
            fn(*[tf.constant(feeds[spec.name]) for spec in positional])
        except (tf.errors.OpError, ValueError, TypeError) as error:
            LOG.warning("no warmup request for signature %s: a synthetic one fails (%s)", key,
                        str(error).splitlines()[0])
            continue
        logs.append(warmup.predict_log(feeds, key))
    if logs:
        warmup.write_warmup_requests(export_dir, logs)
    return len(logs)


def _warmup_feeds(specs: dict, num_members: int, ragged: bool) -> dict | None:
    """Zeros for every input: unknown dims are 1, except the rows of a ragged signature,
    which get one per member (group_sizes all ones). None when an input is a string or has
    an unknown rank: no synthetic value is safe there."""
    feeds = {}
    for name, spec in specs.items():
        if spec.shape.rank is None:
            return None
        if spec.dtype.is_floating or spec.dtype.is_integer or spec.dtype.is_bool:
            if ragged and name == "group_sizes":
                feeds[name] = np.ones([num_members], spec.dtype.as_numpy_dtype)
                continue
            dims = spec.shape.as_list()
            if ragged and dims and dims[0] is None:
                dims[0] = num_members
            feeds[name] = np.zeros([1 if d is None else d for d in dims],
                                   spec.dtype.as_numpy_dtype)
        else:
            return None
    return feeds


def require_xla_compiles(fn, num_members: int) -> None:
    """Runs a jit_compile merge once on zeros, so that a graph XLA cannot compile is refused
    at merge time (naming the op) rather than at its first request in a server."""
    import tensorflow as tf
    positional = fn.structured_input_signature[0]
    feeds = _warmup_feeds({spec.name: spec for spec in positional}, num_members, ragged=False)
    if feeds is None:
        LOG.warning("jit_compile: not compiled at merge time (an input is a string or has no "
                    "known rank); XLA compiles it at the first request")
        return
    try:
        fn(*[tf.constant(feeds[spec.name]) for spec in positional])
    except tf.errors.OpError as error:
        text = error.message
        if "XLA" not in text and "compil" not in text.lower():
            LOG.warning("jit_compile: a run on zeros fails (%s); not checked at merge time",
                        text.splitlines()[0])
            return
        lines = [line for line in text.splitlines() if "unsupported operations" in line]
        said = (lines[0].split(": ", 1)[-1] if lines else text.strip())[:1000]
        raise MergeError("jit_compile=True: XLA cannot compile the merged graph; merge "
                         f"without jit_compile. XLA said: {said}") from None


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_output_dir(output_dir, sources, overwrite: bool) -> str:
    """Refuses, before any merge work, an output folder that cannot be written or must not be
    replaced; returns its absolute path."""
    output = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output) and not os.path.isdir(output):
        raise MergeError(f"output {output} is a file, not a folder; give a folder for the "
                         f"merged SavedModel (e.g. merged/1)")
    ancestor = os.path.dirname(output)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise MergeError(f"cannot write output {output}: {ancestor} is a file, not a folder")
    if os.path.exists(output) and not overwrite:
        raise MergeError(f"{output} exists; choose a new folder (e.g. a new version number) "
                         f"or pass overwrite=True")
    real = os.path.realpath(output)
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
            model = os.path.realpath(os.fspath(source))
            how = ("is" if real == model else "contains" if _inside(model, real)
                   else "is inside" if _inside(real, model) else None)
            if how:
                # overwrite replaces an old merged model, never a model being merged
                raise MergeError(f"output {output} {how} the folder of input model {source}; "
                                 f"choose an output folder outside the models being merged")
    return output


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats numbered (``a``, ``a_1``, ...), never taking a name that is
    already used, or that another member has of its own."""
    taken = set(names)
    result: list[str] = []
    used: set[str] = set()
    for name in names:
        candidate, count = name, 0
        while candidate in used or (count and candidate in taken):
            count += 1
            candidate = f"{name}_{count}"
        used.add(candidate)
        result.append(candidate)
    return result


def _require_batch_axes(reference) -> None:
    """Every input's first axis is its batch: the signatures stack, pad and split members'
    inputs along it, which a scalar does not have."""
    for info in reference.inputs:
        if info.shape == []:
            raise MergeError(f"input '{info.name}' is a scalar (shape []) in "
                             f"{reference.source}: a merged model splits each input into its "
                             f"members' rows along the first axis; export the members with "
                             f"this input as shape [None] (one value per row) or shape [1]")


def _require_open_batches(reference) -> None:
    """Ragged mode runs all members' rows as one batch: a graph built for a fixed batch size
    (a Flatten's Reshape to [4, ...]) would reshape them across members."""
    for info in reference.inputs:
        fixed = fixed_batch(info.shape)
        if fixed is not None:
            raise MergeError(f"mode='ragged' needs inputs with an open batch dimension, but "
                             f"input '{info.name}' has a fixed batch size of {fixed} "
                             f"({reference.source}); merge with mode='stock' or 'grouped', or "
                             f"export the members with a batch size of None")


def merge(paths_or_models: Iterable, output_dir: str | None = None, *,
          names: list[str] | None = None, stacked: bool = False, mode: str = "stock",
          signature_key: str = "serving_default", use_channels: bool = True,
          conv_strategy: str = "grouped", jit_compile: bool = False, overwrite: bool = False,
          warmup: bool = True,
          progress: Callable[[str, int, int], None] | None = None) -> MergedModel:
    """Merges N models of one architecture (different weights) into one merged model.

    Args:
      paths_or_models: a list of SavedModel folders (Keras 3 ``model.export()``, tf_keras
        ``save``, ``tf.saved_model.save`` of a tf.Module with a serving signature) or
        in-memory Keras models, all of one architecture. A lone path is refused (a
        ``MergeError``): pass ``[path]`` to merge one model.
      output_dir: where to write the merged SavedModel (must not exist unless ``overwrite``;
        never an input model's folder, one inside it or one containing it). Checked before
        any merge work.
      names: unique member names (default: folder names, or Keras model names, numbered
        ``_1``, ``_2``, ... where they repeat).
      stacked: ``serving_default`` takes ``[N, B, ...]`` inputs instead of ``m{i}_name`` ones.
      mode: ``"stock"`` (stock TF ops only) or ``"ragged"``: the prefixed signature runs the
        members' rows concatenated, without padding, through tfweave's GroupedMatMul op, and a
        ``ragged`` signature takes the rows plus ``group_sizes``; loading it needs tfweave's
        ops (``load_merged`` loads them); its ``stacked`` signature is the grouped one
        below, sharing the weights. ``"grouped"``: the stock
        merge, except that projections by per-model weights (MatMul, Dense, matmul-like
        Einsum) run as one GroupedMatMul over the members' weights stored ``[N, M, K]``:
        faster on CPUs at small per-member batches (the op reads the weights at memory
        speed where BatchMatMulV2 does not); loading it needs tfweave's ops too.
      use_channels: keep convolution chains in the channel-folded layout (no transposes).
      conv_strategy: ``"grouped"`` (one grouped Conv2D for the N members, the paper's way,
        best on GPUs) or ``"batched"`` (1x1 convolutions as one BatchMatMulV2, wider ones as N
        Conv2D ops side by side in the graph; faster on CPUs). Both are stock ops, no loops.
      jit_compile: (stock mode) the merged graph runs as one XLA-compiled function: still
        stock ops, faster on CPUs at a few rows per member (slower from about 64: XLA's
        batched dot loses to oneDNN's there), compiled once per input shape. TF
        Serving runs it with ``--xla_cpu_compilation_enabled=true`` only. Bad gather indices
        still fail as in the members (see ``tfweave.netfuse.xla``). The merge compiles it
        once on zeros and refuses it, naming the op, if XLA cannot.
      overwrite: replace ``output_dir`` if it exists (an earlier merged model).
      warmup: write TF Serving's ``assets.extra/tf_serving_warmup_requests`` (one request of
        zeros per served signature, see ``write_warmup_requests``), so that loading the model
        builds its graphs instead of the first request.
      progress: called as ``progress(stage, done, total)`` while merging.

    Returns a :class:`MergedModel` (runnable in memory; ``.path`` is set when saved).
    """
    import tensorflow as tf
    from tfweave.netfuse.constants import (collect_weights, constant_nodes, frontier_tensors,
                                           reachable_nodes, require_no_loops)
    from tfweave.netfuse.isomorphism import match_all
    from tfweave.netfuse.errors import UnsupportedOpError
    from tfweave.netfuse.lifting import CONV_STRATEGIES, RULES, LiftPlan
    from tfweave.netfuse.sources import freeze_member

    if mode not in MODES:
        raise MergeError(f"mode {mode!r} is not available; use one of {', '.join(MODES)}")
    if conv_strategy not in CONV_STRATEGIES:
        raise MergeError(f"conv_strategy {conv_strategy!r} is not available; use one of "
                         f"{', '.join(CONV_STRATEGIES)}")
    if jit_compile and mode != "stock":
        raise MergeError(f"jit_compile=True needs mode='stock': mode {mode!r} runs tfweave's "
                         "GroupedMatMul, which XLA cannot compile")
    if mode in ("ragged", "grouped"):
        load_ragged_ops()
    if isinstance(paths_or_models, (str, bytes, os.PathLike)):
        # a lone path would otherwise be iterated over, one character per model
        raise MergeError(f"merge() takes a list of models, not one path: pass "
                         f"[{os.fsdecode(paths_or_models)!r}] to merge a single model")
    sources = list(paths_or_models)
    if not sources:
        raise MergeError("nothing to merge: give at least one model")
    if names is not None and len(names) != len(sources):
        raise MergeError(f"{len(names)} names for {len(sources)} models")
    if output_dir is not None:
        output_dir = check_output_dir(output_dir, sources, overwrite)
    if names is not None and not all(isinstance(name, str) and name for name in names):
        raise MergeError(f"member names must be non-empty strings (they are model names in "
                         f"requests), not {[n for n in names if not isinstance(n, str) or not n]}")
    if names is not None and len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise MergeError(f"member names must be unique (requests are routed by name): "
                         f"{', '.join(map(repr, twice))} given more than once")
    total = len(sources)
    report = progress or (lambda stage, done, count: None)

    members, owned = [], []
    for index, source in enumerate(sources):
        member = freeze_member(source, index, names[index] if names else None, signature_key)
        owned.append(member is not source)
        members.append(member)
        LOG.info("froze member %d/%d: %s", index + 1, total, member.source)
        report("freeze", index + 1, total)
    for index, name in enumerate(unique_names(names or [m.name for m in members])):
        if name != members[index].name:
            members[index] = dataclasses.replace(members[index], name=name)

    twin_maps = match_all(members)
    report("match", total, total)
    reference = members[0]
    _require_batch_axes(reference)
    if mode == "ragged":
        _require_open_batches(reference)
    reachable = reachable_nodes(reference)
    require_no_loops(reference, reachable)
    constants = constant_nodes(reference, reachable)
    frontier = frontier_tensors(reference, reachable, constants)
    weights = collect_weights(members, twin_maps, frontier,
                              progress=lambda done: report("weights", done + 1, total))
    for member, frozen_here in zip(members[1:], owned[1:]):
        if frozen_here:  # its graph (a full copy of its weights) is no longer needed
            member.graph_def = None
    plan = LiftPlan(reference, weights, constants, reachable)
    inputs_json = _tensor_specs_json(reference.inputs)
    outputs_json = _tensor_specs_json(reference.outputs)
    unpadded = sorted(set(unbatched_outputs(inputs_json, outputs_json))
                      | set(row_mixing_outputs(reference) if mode != "ragged" else []))
    try:
        module, concrete, weight_bytes = build_module(plan, total, use_channels=use_channels,
                                                      conv_strategy=conv_strategy, mode=mode,
                                                      unpadded=unpadded,
                                                      jit_compile=jit_compile)
    except UnsupportedOpError as error:
        if mode != "ragged" or error.op not in RULES:
            raise
        # refused for ragged rows only: the stock mode pads members' batches and lifts it
        raise UnsupportedOpError(error.op, error.node, f"{error.reason}; merge with "
                                 f"mode='stock' or 'grouped' instead") from error
    if jit_compile:  # the stacked signature: its specs carry a fixed batch, if any
        require_xla_compiles(concrete["stacked"], total)
    report("lift", total, total)
    LOG.info("merged %d members: %d ops lifted, %.1f MB of weights", total, len(plan.order),
             weight_bytes / 2**20)

    metadata = {
        "format": FORMAT_VERSION,
        "members": [{"name": m.name, "source": m.source, "index": i}
                    for i, m in enumerate(members)],
        "inputs": inputs_json,
        "outputs": outputs_json,
        "unpadded_outputs": unpadded,
        "mode": mode,
        "conv_strategy": conv_strategy,
        "stacked": bool(stacked),
        "signatures": {"serving_default": "stacked" if stacked else "prefixed",
                       **{key: key for key in concrete}},
        "batching": ("prefixed inputs are concatenated (no padding) and run through "
                     "GroupedMatMul; signature 'ragged' takes the rows plus group_sizes [N]"
                     if mode == "ragged" else
                     "prefixed inputs are zero-padded to the largest member batch; outputs are "
                     "sliced back per member"),
        "op_libraries": ["grouped_matmul"] if mode in ("ragged", "grouped") else [],
        "jit_compile": bool(jit_compile),
        "weight_bytes": int(weight_bytes),
    }
    path = None
    if output_dir is not None:
        path = save_merged(module, concrete, metadata, output_dir, overwrite=overwrite,
                           warmup=warmup)
        LOG.info("wrote merged SavedModel %s", path)
        report("save", total, total)
    callers = {}
    for key, fn in concrete.items():
        names = [spec.name for spec in tf.nest.flatten(fn.structured_input_signature)]
        callers[key] = (lambda feeds, fn=fn, names=names: fn(*[feeds[n] for n in names]))
    merged = MergedModel(metadata, callers, keep_alive=module, path=path)
    merged.functions = concrete  # the traced signature functions, by signature name
    return merged
