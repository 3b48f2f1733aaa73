"""Small file operations on ``tf.io.gfile`` paths: atomic writes, so a crash never leaves half
a file behind (local disks, GCS and HDFS alike; distributed workers share such a path)."""

from __future__ import annotations

import json
import uuid


def _gfile():
    import tensorflow as tf  # lazy: the CLI imports this module without TensorFlow
    return tf.io.gfile


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes to a temporary name beside ``path`` and renames it over ``path``."""
    gfile = _gfile()
    staged = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    mode = "wb" if isinstance(data, bytes) else "w"
    with gfile.GFile(staged, mode) as f:
        f.write(data)
    gfile.rename(staged, path, overwrite=True)


def atomic_write_json(path: str, value, compact: bool = False) -> None:
    if compact:
        atomic_write(path, json.dumps(value, separators=(",", ":")))
    else:
        atomic_write(path, json.dumps(value, indent=1, sort_keys=True))


def read_bytes(path: str) -> bytes:
    with _gfile().GFile(path, "rb") as f:
        return f.read()


def read_json(path: str):
    with _gfile().GFile(path, "r") as f:
        return json.load(f)


def exists(path: str) -> bool:
    return _gfile().exists(path)


def remove(path: str) -> None:
    if _gfile().exists(path):
        _gfile().remove(path)


def makedirs(path: str) -> None:
    _gfile().makedirs(path)


def size(path: str) -> int:
    return _gfile().stat(path).length
