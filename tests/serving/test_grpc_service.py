"""The gRPC front end's error handling, in-process: a real gRPC server on loopback in front of
a stand-in model manager that fails on demand, driven by tensorflow-serving-api's stubs.

A fault of ours must answer INTERNAL and be counted so, while the errors the handler raises on
purpose (``context.abort`` unwinds with a bare Exception) keep their own code in both places.
"""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from tfweave.serving.grpc_service import GrpcServer
from tfweave.serving.metrics import Metrics
from tfweave.serving.status import invalid_argument, not_found


class FailingManager:
    """Stands in for ModelManager: each model name fails its own way."""

    def predict(self, name, version, label, signature_name, inputs, output_filter=()):
        return self._fail(name)

    def resolve(self, name, version=None, label=None):
        return self._fail(name)

    @staticmethod
    def _fail(name):
        if name == "buggy":
            raise KeyError("a bug of ours")
        if name == "missing":
            raise not_found(f"Servable not found for request: Latest({name})")
        if name == "refused":
            raise invalid_argument("Expects arg[0] to be float but int32 is provided")
        if name == "abandoned":   # its task was dropped: the client went away
            future = concurrent.futures.Future()
            future.cancel()
            return None, None, future
        raise AssertionError(f"unexpected model {name}")


@pytest.fixture(scope="module")
def served():
    metrics = Metrics()
    server = GrpcServer(FailingManager(), metrics, "127.0.0.1", 0, max_request_bytes=1 << 20)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel), metrics
    channel.close()
    server.stop()


def _predict_error(stub, name: str) -> grpc.RpcError:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 2), np.float32)))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=30)
    return caught.value


def _counted(metrics: Metrics, name: str, api: str) -> dict[str, int]:
    """Request counts of one model and API by status, read from the Prometheus page."""
    prefix = f':tensorflow:serving:request_count{{model_name="{name}",API="{api}",'
    counts = {}
    for line in metrics.render().splitlines():
        if line.startswith(prefix):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = int(line.split()[-1])
    return counts


def test_an_unexpected_fault_in_predict_answers_internal_and_is_counted_internal(served):
    stub, metrics = served
    error = _predict_error(stub, "buggy")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in error.details() and "a bug of ours" in error.details()
    assert _counted(metrics, "buggy", "predict") == {"INTERNAL": 1}


def test_an_unexpected_fault_in_get_model_metadata_answers_internal(served):
    stub, metrics = served
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "buggy"
    request.metadata_field.append("signature_def")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModelMetadata(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in caught.value.details()
    assert _counted(metrics, "buggy", "metadata") == {"INTERNAL": 1}


@pytest.mark.parametrize("name, code", [("missing", grpc.StatusCode.NOT_FOUND),
                                        ("refused", grpc.StatusCode.INVALID_ARGUMENT),
                                        ("abandoned", grpc.StatusCode.CANCELLED)])
def test_errors_raised_on_purpose_keep_their_code_in_the_answer_and_the_count(served, name,
                                                                             code):
    stub, metrics = served
    error = _predict_error(stub, name)
    assert error.code() == code
    assert _counted(metrics, name, "predict") == {code.name: 1}
