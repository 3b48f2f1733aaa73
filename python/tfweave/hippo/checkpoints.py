"""Whole-training-state checkpoints at stage boundaries.

A forked child must continue exactly as an unforked run would, so a checkpoint holds everything
training reads: model variables (including Keras ``SeedGenerator`` states, e.g. dropout's),
optimizer variables (slots and iteration count), the process RNGs (Python, NumPy, Keras' global
seed generator, TensorFlow's global generator and eager op-seed stream) and the data-pipeline
position (epoch, shuffle seed, batch size).

File layout: ``MAGIC``, an 8-byte header length, a JSON header ``{"sha256", "meta"}``, then the
payload (an uncompressed ``.npz``). The checksum covers the meta JSON and the payload, so a torn or
corrupted file is detected before any variable is touched. Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import struct
import time

import numpy as np

from tfweave.hippo import storage

MAGIC = b"TFWEAVE-HIPPO-CKPT-1\n"
# Appears in the message of a stage that could not start from its parent's checkpoint, so the
# oracle (possibly in another process, seeing only the trial's message) reruns the parent.
UNUSABLE_TAG = "[hippo:checkpoint-unusable]"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or fails its checksum."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{UNUSABLE_TAG} checkpoint {path}: {reason}; the stage that wrote it "
                         f"will be rerun from its parent")
        self.path = path


@dataclasses.dataclass
class CheckpointStats:
    bytes: int
    seconds: float


def _optimizer_variables(model) -> list:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    if not optimizer.built:
        # Keras creates slot variables lazily; without building first, loading would skip them
        # and the resumed run would restart momentum/Adam moments from zero.
        optimizer.build(model.trainable_variables)
    return list(optimizer.variables)


def save_training_state(path: str, model, *, data_state: dict, extra: dict | None = None
                        ) -> CheckpointStats:
    start = time.perf_counter()
    arrays, meta = {}, {"data": dict(data_state), "extra": dict(extra or {}), "variables": {}}
    for group, variables in (("model", list(model.variables)),
                             ("optimizer", _optimizer_variables(model))):
        meta["variables"][group] = []
        for i, variable in enumerate(variables):
            value = np.asarray(variable.numpy())
            arrays[f"{group}/{i:05d}"] = value
            meta["variables"][group].append([variable.path, list(value.shape)])
    rng_arrays, meta["rng"] = _capture_rng_state()
    arrays.update(rng_arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    meta_json = json.dumps(meta, sort_keys=True)
    header = json.dumps({"sha256": _digest(meta_json, payload), "meta": meta_json}).encode()
    blob = MAGIC + struct.pack("<Q", len(header)) + header + payload
    storage.atomic_write(path, blob)
    return CheckpointStats(len(blob), time.perf_counter() - start)


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """Returns (meta, arrays) after checking the checksum; raises CheckpointError."""
    if not storage.exists(path):
        raise CheckpointError(path, "file is missing")
    blob = storage.read_bytes(path)
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 8:
        raise CheckpointError(path, "not a hippo checkpoint (bad header)")
    offset = len(MAGIC)
    (header_length,) = struct.unpack("<Q", blob[offset:offset + 8])
    offset += 8
    try:
        header = json.loads(blob[offset:offset + header_length].decode())
        meta_json = header["meta"]
    except (ValueError, KeyError, UnicodeDecodeError):
        raise CheckpointError(path, "header is corrupted") from None
    payload = blob[offset + header_length:]
    if _digest(meta_json, payload) != header.get("sha256"):
        raise CheckpointError(path, "checksum mismatch (file corrupted or truncated)")
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return json.loads(meta_json), arrays


def restore_training_state(path: str, model) -> tuple[dict, CheckpointStats]:
    """Loads a checkpoint into ``model`` (already built and compiled); returns its meta."""
    start = time.perf_counter()
    meta, arrays = read_checkpoint(path)
    for group, variables in (("model", list(model.variables)),
                             ("optimizer", _optimizer_variables(model))):
        saved = meta["variables"][group]
        if len(saved) != len(variables):
            raise ValueError(
                f"checkpoint {path} holds {len(saved)} {group} variables but the model built "
                f"for this stage has {len(variables)}: the model-building function or the "
                f"optimizer changed since the checkpoint was written")
        for i, (variable, (saved_path, shape)) in enumerate(zip(variables, saved)):
            if tuple(variable.shape) != tuple(shape):
                raise ValueError(
                    f"checkpoint {path}: variable {saved_path!r} has shape {tuple(shape)} but "
                    f"the model's {variable.path!r} has {tuple(variable.shape)}")
            variable.assign(arrays[f"{group}/{i:05d}"])
    _restore_rng_state(meta["rng"], arrays)
    return meta, CheckpointStats(sum(a.nbytes for a in arrays.values()),
                                 time.perf_counter() - start)


def snapshot_state(model) -> tuple[list, tuple]:
    """The training state in memory (variables and RNGs), for ``restore_snapshot``."""
    values = [np.array(v.numpy()) for v in list(model.variables) + _optimizer_variables(model)]
    return values, _capture_rng_state()


def restore_snapshot(model, snapshot: tuple[list, tuple]) -> None:
    values, (arrays, meta) = snapshot
    for variable, value in zip(list(model.variables) + _optimizer_variables(model), values):
        variable.assign(value)
    _restore_rng_state(meta, arrays)


def _digest(meta_json: str, payload: bytes) -> str:
    digest = hashlib.sha256(meta_json.encode())
    digest.update(payload)
    return digest.hexdigest()


# --- process RNGs --------------------------------------------------------------------------------

def capture_rng_state() -> tuple[dict, dict]:
    """The process RNGs as (arrays, JSON meta); see ``restore_rng_state``."""
    return _capture_rng_state()


def restore_rng_state(state: tuple[dict, dict]) -> None:
    arrays, meta = state
    _restore_rng_state(meta, arrays)


def _capture_rng_state() -> tuple[dict, dict]:
    arrays, meta = {}, {}
    version, internal, gauss = random.getstate()
    arrays["rng/python"] = np.asarray(internal, dtype=np.int64)
    meta["python"] = {"version": version, "gauss": gauss}
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    arrays["rng/numpy"] = np.asarray(keys)
    meta["numpy"] = {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                     "cached": float(cached)}
    keras_gen, keras_seed = _keras_global()
    if keras_gen is not None:
        arrays["rng/keras_global"] = np.asarray(keras_gen.state.numpy())
    meta["keras_global_seed"] = keras_seed
    tf_gen = _tf_global_generator()
    if tf_gen is not None:
        arrays["rng/tf_global"] = np.asarray(tf_gen.state.numpy())
    op_seeds = _tf_op_seed_rng()
    meta["tf_op_seeds"] = None if op_seeds is None else _jsonable(op_seeds.getstate())
    return arrays, meta


def _restore_rng_state(meta: dict, arrays: dict) -> None:
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, meta["keras_global_seed"])
    if "rng/keras_global" in arrays:
        # An explicit seed: creating the generator must not draw from Python's RNG.
        generator = seed_generator.SeedGenerator(seed=1)
        generator.state.assign(arrays["rng/keras_global"])
        global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, generator)
    else:
        global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    tf_gen = _tf_global_generator()
    if tf_gen is not None and "rng/tf_global" in arrays:
        tf_gen.state.assign(arrays["rng/tf_global"])
    op_seeds = _tf_op_seed_rng()
    if op_seeds is not None and meta.get("tf_op_seeds") is not None:
        op_seeds.setstate(_tupled(meta["tf_op_seeds"]))
    numpy_meta = meta["numpy"]
    np.random.set_state((numpy_meta["name"], arrays["rng/numpy"].astype(np.uint32),
                         numpy_meta["pos"], numpy_meta["has_gauss"], numpy_meta["cached"]))
    # Python's RNG last: the steps above may draw from it.
    random.setstate((meta["python"]["version"],
                     tuple(int(v) for v in arrays["rng/python"]), meta["python"]["gauss"]))


def _keras_global():
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils
    return (global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR),
            global_state.get_global_attribute(rng_utils.GLOBAL_RANDOM_SEED))


def _tf_global_generator():
    # Read without creating one: creating it would itself consume randomness.
    from tensorflow.python.ops import stateful_random_ops
    return getattr(stateful_random_ops, "global_generator", None)


def _tf_op_seed_rng():
    # Eager ops without an op seed draw one from this stream once tf.random.set_seed ran.
    from tensorflow.python.eager import context
    return getattr(context.context(), "_rng", None)


def _jsonable(value):
    if isinstance(value, tuple):
        return {"tuple": [_jsonable(v) for v in value]}
    return value


def _tupled(value):
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_tupled(v) for v in value["tuple"])
    return value
