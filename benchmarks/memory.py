"""Peak memory of loading and running SavedModels, measured in a fresh process.

``python -m benchmarks.memory [--length L] PATH [PATH ...]`` loads every SavedModel given, calls
each one's ``serving_default`` once on one row (unknown axes past the batch axis get ``L``,
default 8), and prints one JSON line: how far the process's peak resident memory (VmHWM) and
its resident memory now (VmRSS) grew over a process that had imported TensorFlow and run one
tf.function. TensorFlow's own start-up is thus not counted for either side of a comparison;
what a loaded model costs beyond its weights (its graphs, its functions' first run) is.

A NetFuse merged model whose ``netfuse.json`` names tfweave's op libraries (grouped and ragged
modes) gets them loaded first, as ``netfuse.load_merged`` does. ``peak_memory(paths)`` runs the
probe as a subprocess and returns its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    """Resets VmHWM to the current resident size (Linux: 5 > /proc/self/clear_refs), so a
    transient peak while TensorFlow was imported is not charged to the models."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _feeds(function, length: int) -> dict:
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in function.structured_input_signature[1].items():
        shape = [1 if i == 0 else length if d is None else d
                 for i, d in enumerate(spec.shape.as_list())]
        if spec.dtype.is_integer:
            feeds[name] = tf.ones(shape, spec.dtype)   # token id 1, mask 1: valid for encoders
        elif spec.dtype.is_floating:
            feeds[name] = tf.constant(rng.standard_normal(shape), spec.dtype)
        else:
            raise SystemExit(f"benchmarks.memory: input {name} has dtype {spec.dtype.name}, "
                             f"which this probe does not feed")
    return feeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("paths", nargs="+", help="SavedModel directories")
    parser.add_argument("--length", type=int, default=8,
                        help="size of unknown axes past the batch axis (sequence length)")
    args = parser.parse_args(argv)
    import tensorflow as tf

    from tfweave.serving.backends import load_op_libraries
    for path in args.paths:
        load_op_libraries(path)
    tf.function(lambda x: x + 1.0)(tf.constant(1.0))   # TensorFlow's runtime, up and running
    base = _status_bytes("VmRSS")
    _reset_peak()
    loaded = [tf.saved_model.load(path) for path in args.paths]
    after_load = _status_bytes("VmRSS")
    for model in loaded:
        function = model.signatures["serving_default"]
        function(**_feeds(function, args.length))
    print(json.dumps({"models": len(loaded),
                      "load_growth_bytes": after_load - base,
                      "peak_growth_bytes": _status_bytes("VmHWM") - base,
                      "rss_growth_bytes": _status_bytes("VmRSS") - base}))


def peak_memory(paths: list[str], length: int = 8, timeout_s: float = 900) -> dict:
    """Runs the probe on ``paths`` in a fresh Python process; returns its JSON."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--length", str(length), *paths],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.memory failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
