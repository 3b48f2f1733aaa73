"""Full batching queues answer at once (gRPC RESOURCE_EXHAUSTED, REST 503) and the server
recovers; queues never grow past max_batch_size * max_enqueued_batches rows."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.serving.model_fixtures import write_text
from tests.serving.model_fixtures import IN_DIM


@pytest.fixture(scope="module")
def server(zoo, start_server, tmp_path_factory):
    # Capacity 8 rows per member; a non-full batch waits 2 s, so queued rows stay queued
    # while the test fills the queue.
    batching = write_text(tmp_path_factory.mktemp("pressure") / "batching.config", """
max_batch_size { value: 8 }
batch_timeout_micros { value: 2000000 }
num_batch_threads { value: 1 }
max_enqueued_batches { value: 1 }
""")
    return start_server(["--model_name", "merged", "--model_base_path", zoo["merged"],
                         "--enable_batching", "--batching_parameters_file", batching])


def _request(name, x):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    return request


def test_full_member_queue_rejects_promptly_then_recovers(server, reference):
    channel = grpc.insecure_channel(server.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, IN_DIM)).astype(np.float32) for _ in range(2)]
    queued = [stub.Predict.future(_request("member0", x), timeout=60) for x in xs]
    deadline = time.monotonic() + 30
    while server.queued_rows() < 6:
        assert time.monotonic() < deadline, "the two requests never reached the queue"
        time.sleep(0.02)

    # 6 of 8 rows are taken: 3 more do not fit, on either protocol, and fail at once
    # (the queued requests are still waiting for their batch timeout).
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(_request("member0", xs[0]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in caught.value.details()
    answer = requests.post(f"{server.rest}/v1/models/member0:predict",
                           json={"inputs": xs[0].tolist()}, timeout=60)
    assert answer.status_code == 503 and "queue" in answer.json()["error"]
    assert not any(f.done() for f in queued)

    # The queued requests are answered correctly, and the member serves again afterwards.
    for x, future in zip(xs, queued):
        got = {k: tf.make_ndarray(v) for k, v in future.result(timeout=60).outputs.items()}
        for key, value in reference("member0", x).items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((8, IN_DIM)).astype(np.float32)   # a full batch runs at once
    response = stub.Predict(_request("member0", x), timeout=60)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probs"]),
                               reference("member0", x)["probs"], rtol=1e-5, atol=1e-6)
    channel.close()


def test_request_larger_than_max_batch_size_is_invalid_argument(server):
    channel = grpc.insecure_channel(server.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(_request("member1", np.zeros((9, IN_DIM), np.float32)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "larger than maximum batch size" in caught.value.details()
    # the error names the member the client asked for, not the merged model behind it
    assert "(model member1)" in caught.value.details()
    channel.close()
