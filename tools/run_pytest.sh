#!/usr/bin/env bash
# Runs the test suite with the venv's Python. pytest exits 5 when it collected no test; for us
# that is a failure, never a pass.
set -uo pipefail
py="$1"; shift
"$py" -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing, since a run that tests nothing proves nothing" >&2
  exit 1
fi
exit "$status"
