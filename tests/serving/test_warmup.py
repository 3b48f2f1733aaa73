"""SavedModel warmup (TF Serving's ``assets.extra/tf_serving_warmup_requests``): replayed when
a version loads, with TF Serving's rules for bad files; ``tfweave merge`` writes one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import requests

from tests.serving.conftest import ServerProcess
from tests.serving.model_fixtures import REPO
from tfweave.serving.warmup import predict_log, write_warmup_requests

WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")


def _write_counting_model(version_dir: str) -> str:
    """A model whose answer says how many times it has run (a variable it increments)."""
    import tensorflow as tf

    class Counting(tf.Module):
        def __init__(self):
            super().__init__()
            self.calls = tf.Variable(0, dtype=tf.int64)

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            calls = self.calls.assign_add(1)
            return {"y": x * 2.0, "calls": tf.fill(tf.shape(x)[:1], calls)}

    module = Counting()
    tf.saved_model.save(module, version_dir, signatures={"serving_default": module.serve})
    return version_dir


def _serve_fails(base_path: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tfweave.cli", "serve", "--model_name", "counting",
               "--model_base_path", base_path, "--port", "0", "--rest_api_port", "0"]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)


def test_warmup_requests_run_once_at_load_before_the_first_request(tmp_path):
    base = tmp_path / "counting"
    version = _write_counting_model(str(base / "1"))
    x = np.ones((1, 2), np.float32)
    write_warmup_requests(version, [predict_log({"x": x})] * 3)
    server = ServerProcess(["--model_name", "counting", "--model_base_path", str(base)],
                           tmp_path)
    try:
        answer = requests.post(f"{server.rest}/v1/models/counting:predict",
                               json={"instances": [[1.0, 2.0]]}, timeout=30).json()
        assert answer["predictions"][0]["calls"] == 4     # three warmup runs, then this one
        assert answer["predictions"][0]["y"] == [2.0, 4.0]
        page = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=30).text
        count = next(line for line in page.splitlines() if line.startswith(
            ":tensorflow:serving:model_warmup_latency_count") and 'status="OK"' in line)
        assert count.split()[-1] == "1" and str(base / "1") in count
    finally:
        server.stop()


@pytest.mark.parametrize("case, words", [
    ("not_tfrecord", ["TFRecord"]),
    ("not_a_log", ["warmup record 0", "PredictionLog"]),
    ("unknown_input", ["warmup record 1", "alias not found"]),
    ("session_run", ["warmup record 0", "SessionRun"]),
])
def test_a_bad_warmup_file_stops_the_load_with_the_file_and_record_named(tmp_path, case,
                                                                         words):
    from tensorflow_serving.apis import prediction_log_pb2

    base = tmp_path / "counting"
    version = _write_counting_model(str(base / "1"))
    good = predict_log({"x": np.ones((1, 2), np.float32)})
    if case == "not_tfrecord":
        os.makedirs(os.path.join(version, "assets.extra"))
        with open(os.path.join(version, WARMUP), "wb") as handle:
            handle.write(b"this is not a TFRecord file at all" * 4)
    elif case == "not_a_log":
        write_warmup_requests(version, [b"\xff\xff\xff garbage"])
    elif case == "unknown_input":
        write_warmup_requests(version, [good, predict_log({"z": np.ones((1, 2), np.float32)})])
    else:
        log = prediction_log_pb2.PredictionLog()
        log.session_run_log.request.feed.add()
        write_warmup_requests(version, [log])
    result = _serve_fails(str(base))
    assert result.returncode == 2, result.stderr[-2000:]
    assert WARMUP in result.stderr
    for word in words:
        assert word in result.stderr


def test_classify_warmup_records_are_skipped_and_the_model_serves(tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    base = tmp_path / "counting"
    version = _write_counting_model(str(base / "1"))
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.name = "counting"
    write_warmup_requests(version, [classify, predict_log({"x": np.ones((1, 2), np.float32)})])
    server = ServerProcess(["--model_name", "counting", "--model_base_path", str(base)],
                           tmp_path)
    try:
        answer = requests.post(f"{server.rest}/v1/models/counting:predict",
                               json={"instances": [[0.5, 0.5]]}, timeout=30).json()
        assert answer["predictions"][0]["calls"] == 2     # the Predict record ran, once
        assert "skipped" in server.log()
    finally:
        server.stop()


def test_merge_writes_warmup_requests_that_the_merged_model_runs(zoo):
    """The merged model carries one request for TF Serving's default signature and, in
    ragged mode, one for the signature tfweave serve batches members through; each matches
    its signature and runs (checked here on the SavedModel through the server's loader)."""
    from tfweave.serving.backends import EmbeddedBackend
    from tfweave.serving.warmup import read_warmup_requests, run_warmup

    version = os.path.join(zoo["merged"], "1")
    logs = read_warmup_requests(version)
    assert logs is not None
    signatures = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert signatures[0] == "serving_default"
    model = EmbeddedBackend().load(version, "merged", 1)
    try:
        assert run_warmup(model, version) == len(logs)
        for log in logs:
            request = log.predict_log.request
            wanted = model.signature_defs[request.model_spec.signature_name].inputs
            assert set(request.inputs) == set(wanted)
    finally:
        model.close()


def test_enable_model_warmup_false_skips_the_replay(tmp_path):
    base = tmp_path / "counting"
    version = _write_counting_model(str(base / "1"))
    write_warmup_requests(version, [predict_log({"x": np.ones((1, 2), np.float32)})] * 2)
    server = ServerProcess(["--model_name", "counting", "--model_base_path", str(base),
                            "--enable_model_warmup=false"], tmp_path)
    try:
        answer = requests.post(f"{server.rest}/v1/models/counting:predict",
                               json={"instances": [[1.0, 1.0]]}, timeout=30).json()
        assert answer["predictions"][0]["calls"] == 1     # no warmup run came first
    finally:
        server.stop()
