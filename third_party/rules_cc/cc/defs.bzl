"""Offline stand-in for rules_cc's defs.bzl: forwards to the C++ rules built into Bazel 4.

Bazel 4's @bazel_tools and its generated @local_config_cc load these names from @rules_cc, and
the default WORKSPACE would fetch rules_cc from GitHub; Debian's bazel-rules-cc is older than
what Bazel 4.2 asks for. Every rule here is the native rule itself, so behaviour is Bazel's own.
"""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_shared_library = getattr(native, "cc_shared_library", None)
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_import = native.objc_import
objc_library = native.objc_library
