"""Requests for different members of a merged model are batched into shared merged runs, and
under 64 concurrent clients every request gets exactly its own member's answer."""

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

CLIENTS = 64
REQUESTS_PER_CLIENT = 32          # 2048 requests in all


@pytest.fixture(scope="module")
def server(zoo, start_server, tmp_path_factory):
    batching = write_text(tmp_path_factory.mktemp("cross") / "batching.config", """
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
num_batch_threads { value: 2 }
max_enqueued_batches { value: 1000 }
""")
    return start_server(["--model_name", "merged", "--model_base_path", zoo["merged"],
                         "--enable_batching", "--batching_parameters_file", batching])


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.mark.slow
def test_64_concurrent_clients_each_get_their_own_members_answer(server, zoo, reference):
    names = zoo["names"]
    channel = grpc.insecure_channel(server.grpc)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    results: list[tuple[str, np.ndarray, dict]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int):
        rng = np.random.default_rng(index)
        session = requests.Session()
        try:
            for i in range(REQUESTS_PER_CLIENT):
                name = names[(index + i) % len(names)]
                x = rng.standard_normal((int(rng.integers(1, 4)), IN_DIM)).astype(np.float32)
                if (index + i) % 4 == 0:   # a quarter of the requests over REST
                    answer = session.post(f"{server.rest}/v1/models/{name}:predict",
                                          json={"inputs": {"x": x.tolist()}}, timeout=60)
                    if answer.status_code != 200:
                        raise RuntimeError(f"REST {answer.status_code}: {answer.text}")
                    got = {k: np.asarray(v, np.float32) for k, v in answer.json()["outputs"].items()}
                else:
                    request = predict_pb2.PredictRequest()
                    request.model_spec.name = name
                    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
                    response = stub.Predict(request, timeout=60)
                    got = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
                with lock:
                    results.append((name, x, got))
        except Exception as error:  # reported below with the client's number
            with lock:
                failures.append(f"client {index}: {error!r}")
        finally:
            session.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    channel.close()
    assert not any(t.is_alive() for t in threads), "clients still running after 240 s"
    assert not failures, failures[:5]
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT

    # One reference call per member over all of its inputs, then slice per request.
    for name in names:
        mine = [(x, got) for n, x, got in results if n == name]
        expected = reference(name, np.concatenate([x for x, _ in mine]))
        offset = 0
        for x, got in mine:
            for key, value in expected.items():
                np.testing.assert_allclose(got[key], value[offset:offset + len(x)],
                                           rtol=1e-5, atol=1e-6)
            offset += len(x)

    page = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=30).text
    runs = _metric(page, ':tfweave:serving:members_per_run_count{model_name="merged"}')
    single = _metric(page, ':tfweave:serving:members_per_run_bucket{model_name="merged",le="1"}')
    batched = _metric(page, ':tfweave:serving:batch_size_sum{model_name="merged"}')
    assert batched == CLIENTS * REQUESTS_PER_CLIENT   # every request went through a merged run
    assert runs < batched                               # ... and runs were shared
    assert single < runs                                # some runs served several members
