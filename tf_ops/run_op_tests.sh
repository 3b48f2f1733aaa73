#!/usr/bin/env bash
# Runs op tests against Bazel-built op libraries (the test behind each //tf_ops/<family>:op_test).
#
#   run_op_tests.sh --python=PYTHON LIBRARY_FILE... -- PYTEST_FILE_PATTERN...
#
# LIBRARY_FILEs (each _<family>_ops.so and its .tf_version record) are linked into one folder
# that TFWEAVE_OPS_DIR names, so tfweave.ops.load_library loads them instead of the pip-built
# ones. This is its own process by design: two libraries registering the same op names cannot
# share one. PYTHON is @local_tensorflow's launcher for the Python whose TensorFlow the libraries
# were built against (the venv's); the working directory is the runfiles tree, which holds
# tests/ and pyproject.toml.
set -euo pipefail

python=""
case "${1:-}" in
  --python=*) python="$(readlink -f "${1#--python=}")"; shift ;;
esac
if [ -z "$python" ] || [ ! -x "$python" ]; then
  echo "run_op_tests.sh: the first argument must be --python=<launcher of the venv's python>" >&2
  exit 1
fi
ops_dir="${TEST_TMPDIR:-$(mktemp -d)}/tfweave_ops"
mkdir -p "$ops_dir"

families=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  file="$1"; shift
  ln -sf "$(readlink -f "$file")" "$ops_dir/$(basename "$file")"
  case "$file" in
    *_ops.so) name="$(basename "$file" .so)"; name="${name#_}"; families+=("${name%_ops}") ;;
  esac
done
[ $# -gt 0 ] && shift
if [ ${#families[@]} -eq 0 ]; then
  echo "run_op_tests.sh: no _<family>_ops.so library was given" >&2
  exit 1
fi

shopt -s nullglob
test_files=()
for pattern in "$@"; do
  matched=($pattern)
  if [ ${#matched[@]} -eq 0 ]; then
    echo "run_op_tests.sh: no test file matches $pattern (is it in //:python_tests?)" >&2
    exit 1
  fi
  test_files+=("${matched[@]}")
done
if [ ${#test_files[@]} -eq 0 ]; then
  echo "run_op_tests.sh: no test file pattern was given" >&2
  exit 1
fi

export TFWEAVE_OPS_DIR="$ops_dir"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# First prove each Bazel-built library loads through tfweave's own loader (version record
# included), so a broken library fails here with the loader's message, not deep in a test.
"$python" - "${families[@]}" <<'PY'
import sys
import tfweave.ops as ops
for family in sys.argv[1:]:
    ops.load_library(family)
    print(f"loaded {ops.library_path(family)}")
PY

# -c pins pytest to the project's settings (markers, strict markers, timeout); the cache
# plugin is off because the runfiles tree is not ours to write in.
set +e
"$python" -m pytest -c pyproject.toml --rootdir=. -p no:cacheprovider -q "${test_files[@]}"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "run_op_tests.sh: pytest collected no tests from ${test_files[*]}: failing" >&2
  exit 1
fi
exit "$status"
