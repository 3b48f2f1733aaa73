"""tfweave.ops.load_library: one load per library, and clear errors naming the library and the
rebuild command when a library is missing, stale, unrecorded or unloadable.

Only the error paths use other folders: they fail before (or inside) tf.load_op_library without
registering any op, whereas loading the real library from a second path would register its ops
twice in this process.
"""

import json
import shutil

import pytest
import tensorflow as tf

import tfweave.ops
from tfweave.ops import OpLibraryError, load_library
from tfweave.ops.build import REBUILD_COMMAND, sidecar_path

FAMILY = "grouped_matmul"
LIBRARY = f"_{FAMILY}_ops.so"


@pytest.fixture
def ops_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFWEAVE_OPS_DIR", str(tmp_path))
    return tmp_path


def _copy_library(built, ops_dir):
    copy = ops_dir / LIBRARY
    shutil.copyfile(built, copy)
    return copy


def test_missing_library_names_it_and_the_rebuild_command(ops_dir):
    with pytest.raises(OpLibraryError) as error:
        load_library(FAMILY)
    assert LIBRARY in str(error.value) and str(ops_dir) in str(error.value)
    assert REBUILD_COMMAND in str(error.value)


def test_library_built_for_another_tensorflow_is_refused(grouped_matmul_library, ops_dir):
    copy = _copy_library(grouped_matmul_library, ops_dir)
    record = json.loads(sidecar_path(grouped_matmul_library).read_text())
    record["tensorflow"] = "2.0.0"
    sidecar_path(copy).write_text(json.dumps(record))
    with pytest.raises(OpLibraryError) as error:
        load_library(FAMILY)
    message = str(error.value)
    assert str(copy) in message and "2.0.0" in message and tf.__version__ in message
    assert REBUILD_COMMAND in message


@pytest.mark.parametrize("sidecar_text", [None, "{not json", json.dumps({"gpu": False})])
def test_library_without_a_readable_build_record_is_refused(grouped_matmul_library, ops_dir,
                                                            sidecar_text):
    copy = _copy_library(grouped_matmul_library, ops_dir)
    if sidecar_text is not None:
        sidecar_path(copy).write_text(sidecar_text)
    with pytest.raises(OpLibraryError, match="no build record") as error:
        load_library(FAMILY)
    assert str(copy) in str(error.value) and REBUILD_COMMAND in str(error.value)


def test_bazel_version_file_naming_another_tensorflow_is_refused(grouped_matmul_library,
                                                                  ops_dir):
    copy = _copy_library(grouped_matmul_library, ops_dir)
    copy.with_name(copy.name + ".tf_version").write_text("1.15.0\n")
    with pytest.raises(OpLibraryError, match="built against TensorFlow 1.15.0") as error:
        load_library(FAMILY)
    assert REBUILD_COMMAND in str(error.value)


def test_library_that_does_not_load_is_reported_with_the_rebuild_command(ops_dir):
    library = ops_dir / LIBRARY
    library.write_bytes(b"not a shared object")
    sidecar_path(library).write_text(json.dumps({"tensorflow": tf.__version__}))
    with pytest.raises(OpLibraryError, match="does not load") as error:
        load_library(FAMILY)
    assert str(library) in str(error.value) and REBUILD_COMMAND in str(error.value)


def test_error_paths_leave_nothing_cached(ops_dir):
    with pytest.raises(OpLibraryError):
        load_library(FAMILY)
    assert (FAMILY, str(ops_dir)) not in tfweave.ops._LOADED


def test_the_built_library_loads_once_and_is_cached(grouped_matmul_library):
    assert tfweave.ops.library_path(FAMILY) == grouped_matmul_library
    first = load_library(FAMILY)
    assert load_library(FAMILY) is first
    assert hasattr(first, "grouped_mat_mul") and hasattr(first, "grouped_mat_mul_weight_grad")
