"""Loads tfweave's compiled op libraries, once each.

Every part imports its ops from here (``tfweave.ops.load_library("invoke")``), never with
``tf.load_op_library`` directly, so a library missing or built against another TensorFlow is
reported the same way everywhere: an :class:`OpLibraryError` naming the library and the command
that rebuilds it.

``TFWEAVE_OPS_DIR`` points the loader at another folder of libraries (the tests use it to run the
same op tests against the Bazel-built libraries).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], object] = {}


class OpLibraryError(ImportError):
    """An op library is missing, stale, or does not load into this TensorFlow."""


def library_dir() -> Path:
    from tfweave.ops.build import LIB_DIR  # imported late: `python -m tfweave.ops.build` runs it
    return Path(os.environ.get("TFWEAVE_OPS_DIR") or LIB_DIR)


def gpu_visible() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def library_path(family: str, gpu: bool | None = None) -> Path:
    """The library ``load_library`` uses: the GPU build where a GPU is visible and it exists.

    ``_<family>_ops_gpu.so`` holds the CPU kernels too, so it replaces the CPU library rather
    than joining it (both register the same op names and cannot load into one process).
    """
    directory = library_dir()
    if gpu is None:
        gpu = gpu_visible()
    gpu_library = directory / f"_{family}_ops_gpu.so"
    if gpu and gpu_library.exists():
        return gpu_library
    return directory / f"_{family}_ops.so"


def _check_built_for_this_tensorflow(library: Path, tf_version: str) -> None:
    from tfweave.ops.build import REBUILD_COMMAND, sidecar_path
    if not library.exists():
        raise OpLibraryError(
            f"tfweave op library {library.name} is missing from {library.parent}; "
            f"build it with: {REBUILD_COMMAND}")
    sidecar = sidecar_path(library)
    built_for = None
    if sidecar.exists():
        try:
            built_for = json.loads(sidecar.read_text()).get("tensorflow")
        except (OSError, json.JSONDecodeError):
            built_for = None
    if built_for is None:
        # A Bazel-built library has no sidecar of ours; Bazel writes a version file beside it.
        version_file = library.with_name(library.name + ".tf_version")
        if version_file.exists():
            built_for = version_file.read_text().strip()
    if built_for is None:
        raise OpLibraryError(
            f"tfweave op library {library} has no build record ({sidecar.name}), so the "
            f"TensorFlow it was built against is unknown; rebuild it with: {REBUILD_COMMAND}")
    if built_for != tf_version:
        raise OpLibraryError(
            f"tfweave op library {library} was built against TensorFlow {built_for}, but "
            f"TensorFlow {tf_version} is installed; rebuild it with: {REBUILD_COMMAND}")


def load_library(family: str):
    """Loads ``_<family>_ops.so`` once and returns its generated op module."""
    import tensorflow as tf

    key = (family, str(library_dir()))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        library = library_path(family)
        _check_built_for_this_tensorflow(library, tf.__version__)
        try:
            module = tf.load_op_library(str(library))
        except (tf.errors.NotFoundError, OSError) as error:
            from tfweave.ops.build import REBUILD_COMMAND
            raise OpLibraryError(
                f"tfweave op library {library} does not load into TensorFlow "
                f"{tf.__version__} ({error}); rebuild it with: {REBUILD_COMMAND}") from error
        _LOADED[key] = module
        return module
