#!/usr/bin/env bash
echo "bazel coverage is not supported in tfweave's offline Bazel build (no coverage tools)" >&2
exit 1
