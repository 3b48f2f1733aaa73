"""Builds tfweave's C++/CUDA op libraries as part of ``pip install``.

The op build itself lives in ``python/tfweave/ops/build.py`` (also runnable as
``python -m tfweave.ops.build``); this file only hooks it into setuptools' build_ext, so that
``pip install -e .`` and a wheel build both compile the ops against the installed TensorFlow.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_op_builder():
    spec = importlib.util.spec_from_file_location(
        "_tfweave_op_build", ROOT / "python" / "tfweave" / "ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


class BuildTensorFlowOps(build_ext):
    """Compiles every tf_ops/ family with TensorFlow's own compile and link flags."""

    def run(self):
        builder = _load_op_builder()
        if self.inplace or getattr(self, "editable_mode", False):
            out_dir = ROOT / "python" / "tfweave" / "ops" / "lib"
        else:
            out_dir = Path(self.build_lib) / "tfweave" / "ops" / "lib"
        builder.build_all(ROOT / "tf_ops", out_dir)


# One placeholder extension makes setuptools run build_ext (and mark the wheel platform-specific);
# BuildTensorFlowOps.run builds the real libraries instead of compiling it.
setup(ext_modules=[Extension("tfweave.ops._placeholder", sources=[])],
      cmdclass={"build_ext": BuildTensorFlowOps})
