#!/usr/bin/env bash
# The Bazel build of tfweave's ops, offline, and the op tests against the Bazel-built libraries.
#
#   bash tools/bazel_build.sh PYTHON       (make bazel; make test runs it before pytest)
#
# PYTHON is the venv's python: Bazel's @local_tensorflow is configured from its TensorFlow
# (third_party/tensorflow/tf_configure.bzl), and the op tests run under it. Runs
# `bazel build //tf_ops/...` then `bazel test //...`; exits non-zero when either fails.
# Environment: TFWEAVE_BAZEL_TIMEOUT bounds each bazel command (seconds, default 1800);
# TFWEAVE_BAZEL_JOBS caps parallel actions (default: the number of cores).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash tools/bazel_build.sh PYTHON   (the venv's python, e.g. .venv/bin/python)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

python="$1"
# Absolute, but not resolved: a venv's python is a symlink whose own path selects the venv.
case "$python" in
  */*) python="$(cd "$(dirname "$python")" 2>/dev/null && pwd)/$(basename "$python")" ;;
  *) python="$(command -v "$python" || true)" ;;
esac
if [ ! -x "$python" ]; then
  echo "tools/bazel_build.sh: no Python at '$1'; create the venv first (make install)" >&2
  exit 2
fi
if ! command -v bazel >/dev/null 2>&1; then
  echo "tools/bazel_build.sh: bazel is not installed; run: bash tools/install_system_deps.sh" >&2
  exit 2
fi

# Every op family (a tf_ops/<family>/ops folder, as python -m tfweave.ops.build finds them) must
# have its BUILD file, or Bazel would silently leave it out.
for ops_dir in tf_ops/*/ops; do
  [ -d "$ops_dir" ] || continue
  family_dir="$(dirname "$ops_dir")"
  if [ ! -e "$family_dir/BUILD" ] && [ ! -e "$family_dir/BUILD.bazel" ]; then
    family="$(basename "$family_dir")"
    echo "tools/bazel_build.sh: $family_dir has no BUILD file, so Bazel would not build it; add:" >&2
    echo "  load(\"//tf_ops:tfweave_op.bzl\", \"tfweave_op_library\")" >&2
    echo "  tfweave_op_library(name = \"$family\", tests = [\"tests/<part>/test_<op>*.py\"])" >&2
    exit 1
  fi
done

# Read from package metadata (no TensorFlow import): a change of version reconfigures
# @local_tensorflow, so libraries are never built against headers of another TensorFlow.
tf_version="$("$python" - <<'PY'
import importlib.metadata as metadata
for name in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
    try:
        print(metadata.version(name))
        break
    except metadata.PackageNotFoundError:
        pass
PY
)"
if [ -z "$tf_version" ]; then
  echo "tools/bazel_build.sh: $python has no tensorflow installed; run: make install" >&2
  exit 2
fi

time_limit="${TFWEAVE_BAZEL_TIMEOUT:-1800}"
jobs="${TFWEAVE_BAZEL_JOBS:-$(nproc 2>/dev/null || echo 2)}"
flags=(
  "--repo_env=TFWEAVE_PYTHON=$python"
  "--repo_env=TFWEAVE_TF_VERSION=$tf_version"
  "--jobs=$jobs"
  # Each compile holds TensorFlow's headers in memory; Bazel's default of 2/3 of RAM for itself
  # leaves too little to the tests that run beside it on small machines.
  "--local_ram_resources=HOST_RAM*.5"
)
# A log file, not a terminal: no progress bar redraws, one progress line every half minute.
if [ ! -t 1 ]; then
  flags+=("--curses=no" "--color=no" "--show_progress_rate_limit=30")
fi

run_bazel() {
  echo "+ bazel $*" >&2
  timeout --signal=INT --kill-after=60 "$time_limit" bazel "$@"
}

start=$SECONDS
status=0
run_bazel build "${flags[@]}" -- //tf_ops/... || status=$?
if [ "$status" -eq 0 ]; then
  run_bazel test "${flags[@]}" -- //... || status=$?
fi

if [ "$status" -eq 0 ]; then
  echo "Bazel-built op libraries (TensorFlow $tf_version):"
  for library in bazel-bin/tf_ops/*/_*_ops.so; do
    [ -e "$library" ] && echo "  $library"
  done
  # pytest's own last line from each op test: how many tests ran against those libraries.
  for log in bazel-testlogs/tf_ops/*/op_test/test.log; do
    [ -e "$log" ] || continue
    target="//$(dirname "$(dirname "${log#bazel-testlogs/}")"):op_test"
    echo "  $target: $(grep -E '[0-9]+ (passed|failed)' "$log" | tail -n 1)"
  done
fi
# The Bazel server would otherwise keep its memory for three idle hours while pytest runs.
bazel shutdown >/dev/null 2>&1 || true

elapsed=$((SECONDS - start))
if [ "$status" -eq 124 ]; then
  echo "tools/bazel_build.sh: a bazel command ran longer than ${time_limit}s (TFWEAVE_BAZEL_TIMEOUT)" >&2
elif [ "$status" -ne 0 ]; then
  echo "tools/bazel_build.sh: the Bazel build or its op tests failed (exit $status) after ${elapsed}s" >&2
else
  echo "tools/bazel_build.sh: Bazel build and op tests passed in ${elapsed}s"
fi
exit "$status"
