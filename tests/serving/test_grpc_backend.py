"""``--backend grpc://HOST:PORT``: a front server batches across members and forwards each
merged batch to a second server (here another tfweave serve, both real processes on loopback)
that hosts the merged SavedModel as an ordinary model, as a stock TF Serving would."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.serving.model_fixtures import write_text
from tests.serving.model_fixtures import IN_DIM


@pytest.fixture(scope="module")
def servers(zoo, start_server, tmp_path_factory):
    backend = start_server(["--model_name", "merged", "--model_base_path", zoo["merged"]])
    members = "\n".join(
        f'  config {{ name: "{n}" base_path: "{zoo["merged"]}" model_platform: "netfuse" }}'
        for n in zoo["names"])
    config = write_text(tmp_path_factory.mktemp("front") / "models.config",
                        f"model_config_list {{\n{members}\n}}\n")
    front = start_server(["--model_config_file", config, "--enable_batching",
                          "--backend", f"grpc://{backend.grpc}"])
    return front, backend


def _request(name, x):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    return request


def _count(server, model: str) -> int:
    page = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=30).text
    prefix = (f':tensorflow:serving:request_count{{model_name="{model}",API="predict",'
              'entrypoint="GRPC",status="OK"}')
    return sum(int(l.split()[-1]) for l in page.splitlines() if l.startswith(prefix))


def test_members_served_through_a_grpc_backend_match_the_member_models(servers, zoo,
                                                                       reference):
    front, backend = servers
    channel = grpc.insecure_channel(front.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    rng = np.random.default_rng(3)
    answers, errors = [], []

    def client(name):
        try:
            for _ in range(10):
                x = rng.standard_normal((2, IN_DIM)).astype(np.float32)
                response = stub.Predict(_request(name, x), timeout=60)
                answers.append((name, x, {k: tf.make_ndarray(v)
                                          for k, v in response.outputs.items()}))
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=client, args=(n,)) for n in zoo["names"] * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert len(answers) == 60
    for name, x, got in answers:
        for key, value in reference(name, x).items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    answer = requests.post(f"{front.rest}/v1/models/member1:predict",
                           json={"instances": np.ones((1, IN_DIM)).tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    # Every front request went to the backend inside a merged "merged" run, never per member.
    forwarded = _count(backend, "merged")
    assert 1 <= forwarded <= 61
    assert _count(backend, "member0") == 0
    channel.close()


def test_backend_errors_come_back_with_their_code(servers):
    front, _ = servers
    channel = grpc.insecure_channel(front.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(_request("member0", np.zeros((1, IN_DIM + 2), np.float32)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
