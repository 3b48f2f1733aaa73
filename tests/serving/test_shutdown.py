"""SIGTERM (what a supervisor such as Kubernetes sends) stops the server gracefully: requests
already received, on either protocol, are answered correctly before it exits; new ones are
refused."""

from __future__ import annotations

import signal
import socket
import threading
import time

import grpc
import numpy as np
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.serving.model_fixtures import IN_DIM, write_text


def test_sigterm_answers_the_requests_already_received_then_exits(zoo, reference, start_server,
                                                                  tmp_path):
    # A batch that is not full waits 3 s: the requests below are still queued at SIGTERM.
    batching = write_text(tmp_path / "batching.config", """
max_batch_size { value: 8 }
batch_timeout_micros { value: 3000000 }
num_batch_threads { value: 1 }
""")
    server = start_server(["--model_name", "merged", "--model_base_path", zoo["merged"],
                           "--enable_batching", "--batching_parameters_file", batching,
                           "--shutdown_grace_seconds", "20"])
    rng = np.random.default_rng(3)
    x_grpc, x_rest = (rng.standard_normal((2, IN_DIM)).astype(np.float32) for _ in range(2))
    channel = grpc.insecure_channel(server.grpc)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "member0"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x_grpc))
    grpc_answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.future(
        request, timeout=60)
    rest_answer = {}

    def post():
        rest_answer["response"] = requests.post(f"{server.rest}/v1/models/member1:predict",
                                                json={"inputs": x_rest.tolist()}, timeout=60)

    poster = threading.Thread(target=post)
    poster.start()
    deadline = time.monotonic() + 30
    while server.queued_rows() < 4:
        assert time.monotonic() < deadline, "the two requests never reached the queue"
        time.sleep(0.02)

    server.process.send_signal(signal.SIGTERM)
    # new connections are refused while the queued requests wait for their batch
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", server.rest_port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "the REST port still accepted after SIGTERM"
        time.sleep(0.05)
    assert server.alive()

    got = {k: tf.make_ndarray(v) for k, v in grpc_answer.result(timeout=60).outputs.items()}
    for key, value in reference("member0", x_grpc).items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    poster.join(timeout=60)
    response = rest_answer["response"]
    assert response.status_code == 200, response.text
    for key, value in reference("member1", x_rest).items():
        np.testing.assert_allclose(np.asarray(response.json()["outputs"][key], np.float32),
                                   value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert server.process.wait(timeout=30) == 0
    channel.close()
