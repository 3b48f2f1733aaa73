"""tfweave_op_library: one op family's CPU library, built by Bazel against the pip TensorFlow.

A family folder tf_ops/<family>/ follows STYLE.md's split (ops/*.cc, kernels/*.cc,
kernels/*.h, kernels/*_gpu.cu.cc); its BUILD file is just

    load("//tf_ops:tfweave_op.bzl", "tfweave_op_library")

    tfweave_op_library(name = "<family>", tests = ["tests/ops/test_<family>*.py"])

and yields the same library `python -m tfweave.ops.build` makes:

    //tf_ops/<family>:_<family>_ops.so              linked against libtensorflow_framework.so.2 only
    //tf_ops/<family>:_<family>_ops.so.tf_version   the TensorFlow version it was built for, which
                                                    tfweave.ops.load_library reads as the build
                                                    record of a Bazel-built library
    //tf_ops/<family>                               both files (a filegroup)
    //tf_ops/<family>:op_test                       the family's pytest files, run in their own
                                                    process against the Bazel-built library

GPU kernels (kernels/*.cu.cc) are left out on purpose: they are compiled by
`python -m tfweave.ops.build` when nvcc exists. Bazel 4 has no CUDA toolchain of its own, and
TensorFlow's (@local_config_cuda) is a download, so an offline Bazel build cannot compile them.
"""

load("@local_tensorflow//:build_defs.bzl", "TF_COPTS")


def tfweave_op_library(name, tests = [], extra_libraries = [], test_timeout = "long"):
    """Builds `_<name>_ops.so` from tf_ops/<name>/ and, given `tests`, a test target for it.

    Args:
      name: the family, which is also the folder name under tf_ops/.
      tests: pytest file patterns relative to the repository root (shell globs such as
        "tests/ops/test_grouped_matmul*.py"); empty means no test target.
      extra_libraries: labels of other families (//tf_ops/<other>) whose libraries the tests
        also load; they are put in the same TFWEAVE_OPS_DIR.
      test_timeout: Bazel's timeout class for the test target.
    """
    library = "_%s_ops.so" % name
    srcs = native.glob(["ops/*.cc", "kernels/*.cc"], exclude = ["**/*.cu.cc"])
    if not srcs:
        fail("tf_ops/%s has no ops/*.cc or kernels/*.cc sources" % name)

    native.cc_binary(
        name = library,
        srcs = srcs + native.glob(["**/*.h"]),
        # The pip build's own flags (-std=c++17 -fPIC -O2 ...) are in .bazelrc; TF_COPTS and the
        # framework target's defines are tf.sysconfig.get_compile_flags(), as in the pip build.
        copts = TF_COPTS,
        linkshared = True,
        deps = ["@local_tensorflow//:tensorflow_framework"],
    )
    native.genrule(
        name = library + "_tf_version",
        srcs = ["@local_tensorflow//:tf_version.txt"],
        outs = [library + ".tf_version"],
        cmd = "cp $< $@",
    )
    native.filegroup(
        name = name,
        srcs = [library, library + ".tf_version"],
        visibility = ["//visibility:public"],
    )
    if not tests:
        return

    libraries = [":" + name] + extra_libraries
    native.sh_test(
        name = "op_test",
        srcs = ["//tf_ops:run_op_tests.sh"],
        # Each $(rootpaths) expands to a library and its .tf_version record; after "--" come
        # the pytest file patterns.
        args = ["--python=$(rootpath @local_tensorflow//:python.sh)"] +
               ["$(rootpaths %s)" % family for family in libraries] + ["--"] + tests,
        data = libraries + ["//:python_tests", "@local_tensorflow//:python.sh"],
        timeout = test_timeout,
        # "local": the test runs the venv's Python and its editable tfweave install, both outside
        # Bazel's view, so it runs unsandboxed; "external": for the same reason Bazel must not
        # cache its result (a change to python/tfweave/ must re-run it).
        tags = ["local", "external"],
    )
