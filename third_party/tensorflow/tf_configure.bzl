"""A repository rule that finds the pip-installed TensorFlow by asking its own Python.

tfweave's ops must build against the very TensorFlow that will load them: the pip wheel ships
its headers and libtensorflow_framework.so.2, and tf.sysconfig says which flags it was built
with. The rule runs a Python, links the headers and library into the repository
@local_tensorflow, and writes:

  BUILD           :tensorflow_framework (headers + library + tf.sysconfig's -D defines),
                  :tf_version.txt, :python.sh
  build_defs.bzl  TF_VERSION, TF_COPTS (tf.sysconfig's other compile flags, e.g. --std)
  python.sh       a launcher for that same Python, so op tests run under it

so Bazel and `python -m tfweave.ops.build` cannot drift apart. Nothing is downloaded.

Which Python: $TFWEAVE_PYTHON, else $PYTHON_BIN_PATH, else the project's .venv/bin/python when
it exists, else python3 on PATH. tools/bazel_build.sh also passes TFWEAVE_TF_VERSION (read from
the venv's package metadata) so that upgrading the pip TensorFlow reconfigures this repository.
"""

_ENV_VARS = ["TFWEAVE_PYTHON", "PYTHON_BIN_PATH", "TFWEAVE_TF_VERSION"]

# Printed as JSON on stdout by the Python that will load the ops (TensorFlow logs on stderr).
_QUERY = """
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
print(json.dumps({
    "python": sys.executable,
    "version": tf.__version__,
    "include": tf.sysconfig.get_include(),
    "lib": tf.sysconfig.get_lib(),
    "compile_flags": tf.sysconfig.get_compile_flags(),
    "link_flags": tf.sysconfig.get_link_flags(),
}))
"""

# Header folders CPU ops never reach (CUDA, LLVM, gRPC ... live in include/external, and no
# header outside it includes "external/..."): leaving them out keeps every compile action's
# input set, and so its sandbox, a third of the size.
_EXCLUDED_HEADER_DIRS = ["external"]

def _fail(message):
    fail("tfweave: cannot configure TensorFlow for Bazel: " + message +
         "\nPoint Bazel at the Python that has tensorflow installed, e.g. " +
         "`bazel build --repo_env=TFWEAVE_PYTHON=$PWD/.venv/bin/python //tf_ops/...` " +
         "(tools/bazel_build.sh does this).")

def _find_python(repository_ctx):
    workspace = repository_ctx.path(Label("//:WORKSPACE")).dirname
    for name in ["TFWEAVE_PYTHON", "PYTHON_BIN_PATH"]:
        value = repository_ctx.os.environ.get(name, "").strip()
        if value:
            # Relative to the workspace, not to this repository's folder where Python runs.
            if not value.startswith("/") and "/" in value:
                value = str(workspace) + "/" + value
            return value
    venv_python = workspace.get_child(".venv").get_child("bin").get_child("python")
    if venv_python.exists:
        return str(venv_python)
    found = repository_ctx.which("python3")
    if found == None:
        _fail("no TFWEAVE_PYTHON, no .venv/bin/python and no python3 on PATH")
    return str(found)

def _split_compile_flags(flags):
    """Sorts tf.sysconfig's compile flags into defines and other copts (-I is placed by us)."""
    defines = []
    copts = []
    for flag in flags:
        if flag.startswith("-I"):
            continue
        elif flag.startswith("-D"):
            defines.append(flag[2:])
        else:
            copts.append(flag)
    return defines, copts

def _framework_library_name(link_flags):
    for flag in link_flags:
        if flag.startswith("-l:"):
            return flag[3:]
    return "libtensorflow_framework.so.2"

def _tf_local_config_impl(repository_ctx):
    python = _find_python(repository_ctx)
    result = repository_ctx.execute([python, "-c", _QUERY], timeout = 600, quiet = True)
    if result.return_code != 0:
        _fail("`%s -c 'import tensorflow'` failed (exit %d):\n%s" %
              (python, result.return_code, result.stderr[-2000:]))
    lines = [line for line in result.stdout.strip().split("\n") if line.startswith("{")]
    if not lines:
        _fail("`%s` printed no TensorFlow description; its output was:\n%s" %
              (python, result.stdout[-2000:]))
    info = json.decode(lines[-1])

    expected = repository_ctx.os.environ.get("TFWEAVE_TF_VERSION", "").strip()
    if expected and expected != info["version"]:
        _fail("TFWEAVE_TF_VERSION says TensorFlow %s but %s imports TensorFlow %s" %
              (expected, python, info["version"]))

    include_dir = repository_ctx.path(info["include"])
    if not include_dir.exists:
        _fail("TensorFlow's include folder %s does not exist" % include_dir)
    framework = _framework_library_name(info["link_flags"])
    framework_path = repository_ctx.path(info["lib"] + "/" + framework)
    if not framework_path.exists:
        _fail("TensorFlow's framework library %s does not exist" % framework_path)

    # One symlink per top-level header folder, so that the BUILD file's glob never lists the
    # excluded ones.
    for entry in include_dir.readdir():
        if entry.basename not in _EXCLUDED_HEADER_DIRS:
            repository_ctx.symlink(entry, "include/" + entry.basename)
    repository_ctx.symlink(framework_path, framework)

    defines, copts = _split_compile_flags(info["compile_flags"])
    repository_ctx.template("BUILD", repository_ctx.attr.build_template, {
        "%{framework_library}": framework,
        "%{defines}": repr(defines),
        "%{python}": info["python"],
        "%{version}": info["version"],
    }, executable = False)
    repository_ctx.file("tf_version.txt", info["version"] + "\n", executable = False)
    repository_ctx.file("build_defs.bzl", "\n".join([
        '"""The TensorFlow that %s imports, as tfweave\'s tf_configure.bzl found it."""' %
        info["python"],
        "",
        "TF_VERSION = %r" % info["version"],
        "TF_DEFINES = %r" % defines,
        "TF_COPTS = %r" % copts,
        "",
    ]), executable = False)

    # sys.executable keeps the venv's own path (resolving the symlink would lose the venv).
    repository_ctx.file("python.sh", "\n".join([
        "#!/bin/sh",
        "# The Python whose TensorFlow @local_tensorflow was configured from.",
        'exec "%s" "$@"' % info["python"],
        "",
    ]), executable = True)

tf_local_config = repository_rule(
    implementation = _tf_local_config_impl,
    attrs = {
        "build_template": attr.label(default = Label("//third_party/tensorflow:BUILD.tpl")),
    },
    environ = _ENV_VARS,
    configure = True,
    local = True,
)
