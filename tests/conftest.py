"""Test-wide settings: quiet TensorFlow logs and keep each test's TF state its own."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN must stay on: grouped convolution on CPU needs it (shared DESIGN.md).
os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
