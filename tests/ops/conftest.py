"""Builds the grouped_matmul op library before the op tests, unless it is up to date.

When ``TFWEAVE_OPS_DIR`` is set (the Bazel-built libraries), that folder is used as it is.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def grouped_matmul_library() -> Path:
    from tfweave.ops import library_path
    from tfweave.ops.build import LIB_DIR, OpFamily, TensorFlowBuildInfo, build_family

    if os.environ.get("TFWEAVE_OPS_DIR"):
        return library_path("grouped_matmul")
    family = OpFamily("grouped_matmul", REPO_ROOT / "tf_ops" / "grouped_matmul")
    return build_family(family, LIB_DIR, TensorFlowBuildInfo.from_installed())
