"""Offline stand-in for rules_java's defs.bzl: forwards to the Java rules built into Bazel 4.

Bazel 4's @bazel_tools//tools/jdk loads these names from @rules_java, which the default
WORKSPACE would download. tfweave builds no Java; this only lets Bazel's tools load offline.
"""

java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_lite_proto_library = native.java_lite_proto_library
java_package_configuration = native.java_package_configuration
java_plugin = native.java_plugin
java_proto_library = native.java_proto_library
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain
