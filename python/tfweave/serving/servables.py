"""What a request is served by: one version of a model, plain or a member of a merged model.

``PlainServable`` is a SavedModel served as TF Serving serves it (per-model batching).
``MergedModel`` is one version of a NetFuse merged SavedModel (CONTRACT: signature
``serving_default`` takes member i's inputs as ``m{i}_<input>`` and returns ``m{i}_<output>``,
``assets/netfuse.json`` lists the members); each member is a ``MemberServable`` under its own
model name whose requests go to the merged model's ``MergedBatchQueue``.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from tfweave.serving.batching import MergedBatchQueue, ModelBatchQueue, Retired, Task, batch_rows
from tfweave.serving.status import invalid_argument
from tfweave.serving.tensor_codec import dtype_name, numpy_dtype

LOG = logging.getLogger(__name__)
DEFAULT_SIGNATURE = "serving_default"
RAGGED_SIGNATURE, GROUP_SIZES = "ragged", "group_sizes"
_MEMBER_KEY = re.compile(r"^m(\d+)_(.+)$")


@dataclass(frozen=True)
class TensorSpec:
    dtype: int                      # DataType enum
    shape: tuple | None             # None: unknown rank; dims None when unknown


def _spec(tensor_info) -> TensorSpec:
    shape_proto = tensor_info.tensor_shape
    if shape_proto.unknown_rank:
        return TensorSpec(tensor_info.dtype, None)
    return TensorSpec(tensor_info.dtype,
                      tuple(None if d.size < 0 else int(d.size) for d in shape_proto.dim))


class Signature:
    """A SignatureDef with its inputs' and outputs' dtypes and shapes decoded once."""

    def __init__(self, name: str, proto):
        self.name = name
        self.proto = proto
        self.inputs = {k: _spec(v) for k, v in proto.inputs.items()}
        self.outputs = {k: _spec(v) for k, v in proto.outputs.items()}
        self.output_keys = tuple(sorted(self.outputs))
        self.input_dtypes = {k: v.dtype for k, v in self.inputs.items()}

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """TF Serving's checks (predict_util.cc), in its words, plus dtype and static shape."""
        sent, wanted = set(inputs), set(self.inputs)
        if len(sent) != len(wanted):
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. Missing but required: "
                f"{{{','.join(sorted(wanted - sent))}}}.")
        for i, name in enumerate(sorted(inputs)):
            if name not in self.inputs:
                raise invalid_argument(
                    f"input tensor alias not found in signature: {name}. Inputs expected to be "
                    f"in the set {{{','.join(sorted(wanted))}}}.")
            spec, value = self.inputs[name], inputs[name]
            if value.dtype != np.dtype(numpy_dtype(spec.dtype)):
                sent_enum = _enum_of(value)
                raise invalid_argument(f"Expects arg[{i}] to be {dtype_name(spec.dtype)} but "
                                       f"{dtype_name(sent_enum)} is provided (input '{name}')")
            if spec.shape is not None:
                if value.ndim != len(spec.shape) or any(
                        d is not None and d != s for d, s in zip(spec.shape, value.shape)):
                    want = "[" + ",".join("-1" if d is None else str(d) for d in spec.shape) + "]"
                    raise invalid_argument(
                        f"input '{name}' has shape {list(value.shape)} but the signature "
                        f"{self.name} expects {want} (-1: any size)")

    def check_output_filter(self, output_filter) -> tuple[str, ...]:
        if not output_filter:
            return self.output_keys
        seen = set()
        for key in output_filter:
            if key not in self.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {key} Outputs expected to be "
                    f"in the set {{{','.join(self.output_keys)}}}.")
            if key in seen:
                raise invalid_argument(f"duplicate output tensor alias: {key}")
            seen.add(key)
        return tuple(output_filter)


def _enum_of(value: np.ndarray) -> int:
    from tfweave.serving.tensor_codec import dtype_enum_of
    try:
        return dtype_enum_of(value)
    except Exception:
        return 0


class Servable:
    """One version of one served model name."""

    name: str
    version: int
    signature_defs: dict            # name -> SignatureDef proto (for GetModelMetadata)
    signatures: dict                # name -> Signature

    def signature(self, signature_name: str) -> Signature:
        name = signature_name or DEFAULT_SIGNATURE
        try:
            return self.signatures[name]
        except KeyError:
            raise invalid_argument(f'Serving signature name: "{name}" not found in signature '
                                   "def") from None

    def submit(self, signature: Signature, inputs: dict[str, np.ndarray],
               output_keys: tuple[str, ...]) -> Future:
        raise NotImplementedError


class PlainServable(Servable):
    def __init__(self, name, version, model, scheduler, batching):
        self.name = name
        self.version = version
        self.model = model
        self.signature_defs = model.signature_defs
        self.signatures = {k: Signature(k, v) for k, v in model.signature_defs.items()}
        self._scheduler = scheduler
        self._batching = batching
        self._queues: dict[str, ModelBatchQueue] = {}
        self.retired = False   # set (under the scheduler's lock) when this version unloads

    def retire(self) -> list[ModelBatchQueue]:
        """Refuses new requests from now on; returns the queues to drain."""
        with self._scheduler.cv:
            self.retired = True
            return list(self._queues.values())

    def _queue(self, signature: Signature) -> ModelBatchQueue:
        queue = self._queues.get(signature.name)
        if queue is not None:
            return queue
        with self._scheduler.cv:   # not after retire() has listed the queues to drain
            if self.retired:
                raise Retired(self.name)
            queue = self._queues.get(signature.name)
            if queue is not None:
                return queue
            params = self._batching
            enabled = params is not None
            from tfweave.serving.model_config import BatchingParameters
            params = params or BatchingParameters()

            def run(feeds, output_keys, _sig=signature.name):
                return self.model.run(_sig, feeds, output_keys)

            queue = self._queues.setdefault(signature.name, self._scheduler.add_queue(
                ModelBatchQueue(self._scheduler, self.name, run,
                                max_batch_size=params.max_batch_size,
                                timeout_s=params.batch_timeout_micros / 1e6,
                                max_enqueued_batches=params.max_enqueued_batches,
                                batching=enabled, output_keys=signature.output_keys)))
        return queue

    def submit(self, signature, inputs, output_keys):
        queue = self._queue(signature)
        rows = batch_rows(inputs, strict=False) if queue.batching else None
        return queue.submit(Task(inputs, rows, output_keys))


class MergedModel:
    """One version of a merged SavedModel and the cross-model batch queue feeding it."""

    def __init__(self, name: str, version: int, model, metadata: dict, scheduler, batching):
        self.name = name
        self.version = version
        self.model = model
        self.metadata = metadata
        if DEFAULT_SIGNATURE not in model.signature_defs:
            raise ValueError(f"merged model {model.path}: no '{DEFAULT_SIGNATURE}' signature")
        self.signature = Signature(DEFAULT_SIGNATURE, model.signature_defs[DEFAULT_SIGNATURE])
        members = sorted(metadata["members"], key=lambda m: int(m["index"]))
        self.num_members = len(members)
        # Outputs that combine a member's rows (netfuse.merged_model.unbatched_outputs,
        # row_mixing_outputs) must not see padding: members run with equal batches only.
        self.unpadded = list(metadata.get("unpadded_outputs", []))
        self.member_names = [m["name"] for m in members]
        if [int(m["index"]) for m in members] != list(range(self.num_members)):
            raise ValueError(f"{model.path}/assets/netfuse.json: member indices must be "
                             f"0..{self.num_members - 1}")
        # Stacked form (netfuse.merge(..., stacked=True)): one [N, B, ...] tensor per name.
        self.stacked = bool(metadata.get("stacked")) or not any(
            _MEMBER_KEY.match(k) for k in self.signature.proto.inputs)
        if self.stacked:
            self._check_stacked()
            self.member_inputs = [sorted(self.signature.proto.inputs)] * self.num_members
            self.member_outputs = [sorted(self.signature.proto.outputs)] * self.num_members
        else:
            self.member_inputs = self._split_keys(self.signature.proto.inputs, "input")
            self.member_outputs = self._split_keys(self.signature.proto.outputs, "output")
        self.member_signatures = [self._member_signature(i) for i in range(self.num_members)]
        self.ragged_signature = None if self.stacked else self._ragged_signature()
        self.ragged = self.ragged_signature is not None or (
            False if self.stacked else self._probe_ragged())
        LOG.info("merged model %s v%d: %d members, %s", name, version, self.num_members,
                 "stacked [N, B, ...] inputs" if self.stacked else
                 "ragged signature (busy members' rows concatenated, GroupedMatMul)"
                 if self.ragged_signature is not None else
                 "zero-row inputs for idle members" if self.ragged else
                 "idle members padded (graph needs equal batch sizes)")
        from tfweave.serving.model_config import BatchingParameters
        params = batching or BatchingParameters()
        self.queue = scheduler.add_queue(MergedBatchQueue(
            scheduler, name, self, max_batch_size=params.max_batch_size,
            timeout_s=params.batch_timeout_micros / 1e6,
            max_enqueued_batches=params.max_enqueued_batches, batching=batching is not None,
            max_in_flight=getattr(model, "concurrent_runs", 1)))

    def _split_keys(self, tensor_map, what) -> list[list[str]]:
        per_member: list[set] = [set() for _ in range(self.num_members)]
        for key in tensor_map:
            match = _MEMBER_KEY.match(key)
            if not match or int(match.group(1)) >= self.num_members:
                raise ValueError(f"merged model {self.model.path}: signature {what} {key!r} is "
                                 f"not m<i>_<name> for a member i < {self.num_members}")
            per_member[int(match.group(1))].add(match.group(2))
        if any(names != per_member[0] for names in per_member):
            raise ValueError(f"merged model {self.model.path}: members disagree on {what} "
                             f"names: {[sorted(n) for n in per_member]}")
        return [sorted(names) for names in per_member]

    def _check_stacked(self):
        for what, specs in (("input", self.signature.inputs), ("output", self.signature.outputs)):
            for key, spec in specs.items():
                if spec.shape is None or len(spec.shape) < 2 or spec.shape[0] not in (
                        None, self.num_members):
                    raise ValueError(
                        f"merged model {self.model.path}: stacked {what} {key!r} must have "
                        f"shape [{self.num_members}, batch, ...], has {spec.shape}")

    def _member_signature(self, i: int) -> Signature:
        from tensorflow.core.protobuf import meta_graph_pb2
        merged = self.signature.proto
        proto = meta_graph_pb2.SignatureDef(method_name=merged.method_name)
        for target, source, names in ((proto.inputs, merged.inputs, self.member_inputs[i]),
                                      (proto.outputs, merged.outputs, self.member_outputs[i])):
            for name in names:
                if self.stacked:
                    info = target[name]
                    info.CopyFrom(source[name])
                    del info.tensor_shape.dim[0]   # a member sees [B, ...], not [N, B, ...]
                else:
                    target[name].CopyFrom(source[f"m{i}_{name}"])
        return Signature(DEFAULT_SIGNATURE, proto)

    def _ragged_signature(self) -> Signature | None:
        """The ``ragged`` signature of a ``mode="ragged"`` merge: each input as the rows of all
        members ``[T, ...]`` plus ``group_sizes`` int32 ``[N]``; members without rows cost
        nothing, and one run needs 1 + inputs feeds instead of N x inputs."""
        if self.metadata.get("mode") != "ragged" or RAGGED_SIGNATURE not in \
                self.model.signature_defs:
            return None
        signature = Signature(RAGGED_SIGNATURE, self.model.signature_defs[RAGGED_SIGNATURE])
        if (set(signature.inputs) != set(self.member_inputs[0]) | {GROUP_SIZES}
                or set(signature.outputs) != set(self.member_outputs[0])):
            LOG.warning("merged model %s: signature '%s' does not match the members' inputs "
                        "and outputs; using '%s' instead", self.name, RAGGED_SIGNATURE,
                        DEFAULT_SIGNATURE)
            return None
        return signature

    def _run_ragged(self, per_member: list[list[Task]], rows: list[int]):
        """One ragged run over the busy members' rows (which agree beyond the batch axis)."""
        results: list[dict] = [{} for _ in per_member]
        members = [i for i, tasks in enumerate(per_member) if tasks]
        sizes = np.zeros(self.num_members, np.int32)
        for i in members:
            sizes[i] = rows[i]
        feeds = {}
        for name in self.member_inputs[0]:
            parts = [t.inputs[name] for i in members for t in per_member[i]]
            feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        feeds[GROUP_SIZES] = sizes
        outputs = self.model.run(RAGGED_SIGNATURE, feeds, self.ragged_signature.output_keys)
        total = int(sizes.sum())
        for key, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                from tfweave.serving.status import internal
                raise internal(f"merged model {self.name}: ragged output {key} has shape "
                               f"{list(value.shape)}, expected {total} rows")
        offset = 0
        for i in members:
            end = offset + rows[i]
            results[i] = {k: v[offset:end] for k, v in outputs.items()}
            offset = end
        return results

    def _run_stacked(self, per_member: list[list[Task]], rows: list[int]):
        batch = max(max(rows), 1)
        feeds = {}
        for name in self.member_inputs[0]:
            like = next(t.inputs[name] for tasks in per_member for t in tasks)
            stacked = np.zeros((self.num_members, batch) + like.shape[1:], like.dtype) \
                if like.dtype != object else np.full(
                    (self.num_members, batch) + like.shape[1:], b"", dtype=object)
            for i, tasks in enumerate(per_member):
                offset = 0
                for task in tasks:
                    stacked[i, offset:offset + task.rows] = task.inputs[name]
                    offset += task.rows
            feeds[name] = stacked
        outputs = self.model.run(DEFAULT_SIGNATURE, feeds, self.signature.output_keys)
        results = []
        for i, tasks in enumerate(per_member):
            results.append({o: outputs[o][i, :rows[i]] for o in self.member_outputs[i]}
                           if tasks else {})
        return results

    def _filler(self, key: str, rows: int, like: np.ndarray | None) -> np.ndarray:
        spec = self.signature.inputs[key]
        dtype = numpy_dtype(spec.dtype)
        if like is not None:
            shape = (rows,) + like.shape[1:]
        else:
            shape = (rows,) + tuple(1 if d is None else d for d in (spec.shape or (None,))[1:])
        if dtype is np.object_:
            filler = np.empty(shape, dtype=object)
            filler.fill(b"")
            return filler
        return np.zeros(shape, dtype=dtype)

    def _probe_ragged(self) -> bool:
        """Whether the merged graph takes zero rows for some members and one for another."""
        feeds = {}
        for i in range(self.num_members):
            for name in self.member_inputs[i]:
                key = f"m{i}_{name}"
                feeds[key] = self._filler(key, 1 if i == 0 else 0, None)
        try:
            outputs = self.model.run(DEFAULT_SIGNATURE, feeds, self.signature.output_keys)
        except Exception as error:
            LOG.info("merged model %s rejects zero-row members (%s); padding instead",
                     self.name, str(error).splitlines()[0][:200])
            return False
        for key, value in outputs.items():
            expected = 1 if key.startswith("m0_") else 0
            if value.ndim == 0 or value.shape[0] != expected:
                return False
        return True

    def run_members(self, per_member: list[list[Task]]) -> list[dict[str, np.ndarray]]:
        """Runs one merged batch; returns each member's outputs (its own rows first).

        The merged graph stacks or concatenates the members' rows, so they share a run only
        if they agree beyond the batch axis (sequence length, image size, ...): members whose
        requests have another shape run in a run of their own, beside the others. Where an
        output combines rows (``unpadded_outputs``), members share a run only with the same
        number of rows."""
        groups: dict[tuple, list[int]] = {}
        for i, tasks in enumerate(per_member):
            if tasks:   # a member's batch holds one shape (MergedBatchQueue.take)
                key = tasks[0].shape_key
                if self.unpadded:   # outputs that combine rows: no padding, equal batches
                    key = (key, sum(t.rows for t in tasks))
                groups.setdefault(key, []).append(i)
        if len(groups) <= 1:
            return self._run_group(per_member)
        results: list[dict[str, np.ndarray]] = [{} for _ in per_member]
        for members in groups.values():
            chosen = set(members)
            part = self._run_group([tasks if i in chosen else []
                                    for i, tasks in enumerate(per_member)])
            for i in members:
                results[i] = part[i]
        return results

    def _run_group(self, per_member: list[list[Task]]) -> list[dict[str, np.ndarray]]:
        rows = [sum(t.rows for t in tasks) for tasks in per_member]
        if self.stacked:
            return self._run_stacked(per_member, rows)
        if self.ragged_signature is not None:
            return self._run_ragged(per_member, rows)
        padded_rows = rows if self.ragged else [max(max(rows), 1)] * self.num_members
        like = {}
        for tasks in per_member:
            if tasks:
                for name, value in tasks[0].inputs.items():
                    like.setdefault(name, value)
        feeds = {}
        for i, tasks in enumerate(per_member):
            for name in self.member_inputs[i]:
                key = f"m{i}_{name}"
                if not tasks:
                    feeds[key] = self._filler(key, padded_rows[i], like.get(name))
                    continue
                parts = [t.inputs[name] for t in tasks]
                if padded_rows[i] > rows[i]:
                    parts.append(self._filler(key, padded_rows[i] - rows[i], parts[0]))
                feeds[key] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # Always fetch every output: one fixed fetch list means one session callable, where a
        # fetch list per combination of busy members would build a new callable per batch.
        outputs = self.model.run(DEFAULT_SIGNATURE, feeds, self.signature.output_keys)
        results = []
        for i, tasks in enumerate(per_member):
            if not tasks:
                results.append({})
                continue
            member = {}
            for o in self.member_outputs[i]:
                value = outputs[f"m{i}_{o}"]
                if value.ndim == 0 or value.shape[0] != padded_rows[i]:
                    from tfweave.serving.status import internal
                    raise internal(f"merged model {self.name}: output m{i}_{o} has shape "
                                   f"{list(value.shape)}, expected {padded_rows[i]} rows")
                member[o] = value[:rows[i]]
            results.append(member)
        return results


class MemberServable(Servable):
    """A member of a merged model, served under its own name."""

    def __init__(self, name: str, merged: MergedModel, index: int):
        self.name = name
        self.version = merged.version
        self.merged = merged
        self.index = index
        signature = merged.member_signatures[index]
        self.signatures = {DEFAULT_SIGNATURE: signature}
        self.signature_defs = {DEFAULT_SIGNATURE: signature.proto}

    def submit(self, signature, inputs, output_keys):
        queue = self.merged.queue
        rows = batch_rows(inputs, strict=True)
        return queue.submit(Task(inputs, rows, output_keys, member=self.index))
