"""A merged model saved in NetFuse's ragged mode (signature ``ragged``: the busy members' rows
concatenated plus ``group_sizes``, GroupedMatMul inside) is served through that signature, and
every member answers exactly as its own SavedModel does, whether all members or only some of
them have requests in a merged run."""

from __future__ import annotations

import json
import os
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.serving.model_fixtures import IN_DIM, write_text


@pytest.fixture(scope="module")
def ragged_merged(zoo, tmp_path_factory):
    from tfweave import netfuse

    root = tmp_path_factory.mktemp("ragged")
    sources = [os.path.join(zoo["members"][name], "1") for name in zoo["names"]]
    names = [f"ragged{i}" for i in range(len(sources))]
    netfuse.merge(sources, str(root / "merged" / "1"), names=names, mode="ragged")
    with open(root / "merged" / "1" / "assets" / "netfuse.json") as f:
        assert json.load(f)["mode"] == "ragged"
    return {"path": str(root / "merged"), "names": names,
            "reference_names": dict(zip(names, zoo["names"])), "root": root}


@pytest.fixture(scope="module")
def server(ragged_merged, start_server):
    # A long timeout so that requests sent together for some members share one merged run.
    batching = write_text(ragged_merged["root"] / "batching.config", """
max_batch_size { value: 16 }
batch_timeout_micros { value: 20000 }
num_batch_threads { value: 1 }
max_enqueued_batches { value: 100 }
""")
    return start_server(["--model_name", "merged", "--model_base_path", ragged_merged["path"],
                         "--enable_batching", "--batching_parameters_file", batching])


def _predict(stub, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    response = stub.Predict(request, timeout=60)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _check(got, name, x, ragged_merged, reference):
    expected = reference(ragged_merged["reference_names"][name], x)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5)


def test_server_uses_the_ragged_signature(server):
    assert "ragged signature" in server.log()


def test_a_lone_member_answers_as_its_own_model(server, ragged_merged, reference):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc))
    rng = np.random.default_rng(1)
    for name in ragged_merged["names"]:
        for rows in (1, 3):
            x = rng.standard_normal((rows, IN_DIM)).astype(np.float32)
            _check(_predict(stub, name, x), name, x, ragged_merged, reference)


@pytest.mark.parametrize("busy", [[0, 2], [1], [0, 1, 2]])
def test_requests_for_some_members_batched_together_get_their_own_answers(
        server, ragged_merged, reference, busy):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc))
    names = [ragged_merged["names"][i] for i in busy]
    rng = np.random.default_rng(len(busy))
    jobs = [(name, rng.standard_normal((int(rng.integers(1, 4)), IN_DIM)).astype(np.float32))
            for name in names for _ in range(3)]
    answers: dict[int, dict] = {}
    errors: list[str] = []

    def send(index):
        try:
            answers[index] = _predict(stub, *jobs[index])
        except Exception as error:  # reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for index, (name, x) in enumerate(jobs):
        _check(answers[index], name, x, ragged_merged, reference)
