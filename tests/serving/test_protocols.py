"""TF Serving's gRPC and REST protocols against plain SavedModels and merged-model members.

Clients are tensorflow-serving-api's own stubs and ``requests``; every answer is compared with
the member SavedModel's own output computed in this process.
"""

from __future__ import annotations

import json
import shutil
import socket
from http.client import HTTPResponse
from urllib.parse import quote

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from tests.serving.model_fixtures import write_text
from tests.serving.model_fixtures import IN_DIM

RNG = np.random.default_rng(42)
NON_ASCII_NAME = "modèle"   # member0's SavedModel under a name that is not ASCII


@pytest.fixture(scope="module")
def server(zoo, start_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    versioned = tmp / "versioned"
    shutil.copytree(f"{zoo['members']['member0']}/1", versioned / "1")
    shutil.copytree(f"{zoo['members']['member1']}/1", versioned / "2")
    plain = "\n".join(
        f'  config {{ name: "plain{i}" base_path: "{zoo["members"][n]}" '
        f'model_platform: "tensorflow" }}' for i, n in enumerate(zoo["names"]))
    members = "\n".join(
        f'  config {{ name: "{n}" base_path: "{zoo["merged"]}" model_platform: "netfuse" }}'
        for n in zoo["names"])
    contract = "\n".join(
        f'  config {{ name: "{n}" base_path: "{zoo["contract_merged"]}" '
        f'model_platform: "netfuse" }}' for n in zoo["contract_names"])
    contract += "\n" + "\n".join(
        f'  config {{ name: "{n}" base_path: "{zoo["stacked_merged"]}" '
        f'model_platform: "netfuse" }}' for n in zoo["stacked_names"])
    config = write_text(tmp / "models.config", f"""
model_config_list {{
{plain}
{members}
  config {{ name: "merged" base_path: "{zoo['merged']}" model_platform: "tensorflow" }}
{contract}
  config {{ name: "versioned" base_path: "{versioned}" }}
  config {{ name: "{NON_ASCII_NAME}" base_path: "{zoo['members']['member0']}" }}
  config {{
    name: "both_versions" base_path: "{versioned}"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
}}
""")
    batching = write_text(tmp / "batching.config", """
max_batch_size { value: 64 }
batch_timeout_micros { value: 1000 }
num_batch_threads { value: 2 }
max_enqueued_batches { value: 100 }
""")
    return start_server(["--model_config_file", config, "--enable_batching",
                         "--batching_parameters_file", batching])


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.grpc)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


def predict_request(model, x, *, version=None, label=None, signature="", output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.model_spec.signature_name = signature
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    request.output_filter.extend(output_filter)
    return request


def assert_outputs(got: dict, expected: dict):
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(np.asarray(got[key], np.float32), expected[key],
                                   rtol=1e-5, atol=1e-6, err_msg=key)


def test_grpc_predict_on_each_merged_member_equals_the_member_model(stubs, zoo, reference):
    predict, _ = stubs
    for name in zoo["names"]:
        x = RNG.standard_normal((3, IN_DIM)).astype(np.float32)
        response = predict.Predict(predict_request(name, x), timeout=30)
        assert response.model_spec.name == name
        assert response.model_spec.version.value == 1
        assert response.model_spec.signature_name == "serving_default"
        assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                       reference(name, x))


def test_hand_written_contract_model_members_equal_the_member_models(stubs, zoo, reference):
    """The merged-model CONTRACT itself (written by hand, independent of the merge pass)."""
    predict, _ = stubs
    for name in zoo["contract_names"]:
        x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
        response = predict.Predict(predict_request(name, x), timeout=30)
        assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                       reference(name, x))


def test_stacked_merged_model_members_equal_the_member_models(server, stubs, zoo, reference):
    """The stacked form ([N, B, ...] inputs): members see [B, ...] and get their own rows."""
    predict, _ = stubs
    for name in zoo["stacked_names"]:
        x = RNG.standard_normal((3, IN_DIM)).astype(np.float32)
        response = predict.Predict(predict_request(name, x), timeout=30)
        assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                       reference(name, x))
    answer = requests.get(f"{server.rest}/v1/models/stacked1/metadata", timeout=30).json()
    shape = answer["metadata"]["signature_def"]["signature_def"]["serving_default"][
        "inputs"]["x"]["tensor_shape"]["dim"]
    assert [int(d["size"]) for d in shape] == [-1, IN_DIM]


def test_grpc_predict_on_plain_models_equals_their_saved_model(stubs, zoo, reference):
    predict, _ = stubs
    for i, name in enumerate(zoo["names"]):
        x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
        response = predict.Predict(predict_request(f"plain{i}", x), timeout=30)
        assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                       reference(name, x))


def test_merged_model_itself_is_served_as_an_ordinary_model(stubs, zoo, reference):
    predict, _ = stubs
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "merged"
    xs = [RNG.standard_normal((i + 1, IN_DIM)).astype(np.float32) for i in range(3)]
    for i, x in enumerate(xs):
        request.inputs[f"m{i}_x"].CopyFrom(tf.make_tensor_proto(x))
    response = predict.Predict(request, timeout=30)
    for i, name in enumerate(zoo["names"]):
        expected = reference(name, xs[i])
        for key in expected:
            np.testing.assert_allclose(tf.make_ndarray(response.outputs[f"m{i}_{key}"]),
                                       expected[key], rtol=1e-5, atol=1e-6)


def test_grpc_output_filter_returns_only_the_requested_outputs(stubs, reference):
    predict, _ = stubs
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    response = predict.Predict(predict_request("member1", x, output_filter=["probs"]),
                               timeout=30)
    assert list(response.outputs) == ["probs"]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probs"]),
                               reference("member1", x)["probs"], rtol=1e-5, atol=1e-6)


def test_rest_row_format_answers_one_prediction_object_per_instance(server, reference):
    x = RNG.standard_normal((3, IN_DIM)).astype(np.float32)
    for model in ("member2", "plain2"):
        answer = requests.post(f"{server.rest}/v1/models/{model}:predict",
                               json={"instances": x.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 3 and set(predictions[0]) == {"logits", "probs"}
        expected = reference("member2", x)
        assert_outputs({k: [p[k] for p in predictions] for k in predictions[0]}, expected)


def test_rest_row_format_with_named_instances_and_explicit_signature(server, reference):
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    answer = requests.post(f"{server.rest}/v1/models/member0/versions/1:predict",
                           json={"signature_name": "serving_default",
                                 "instances": [{"x": row} for row in x.tolist()]}, timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert_outputs({k: [p[k] for p in predictions] for k in predictions[0]},
                   reference("member0", x))


def test_rest_columnar_format_answers_an_outputs_object(server, reference):
    x = RNG.standard_normal((4, IN_DIM)).astype(np.float32)
    for inputs in ({"x": x.tolist()}, x.tolist()):
        answer = requests.post(f"{server.rest}/v1/models/member1:predict",
                               json={"inputs": inputs}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert_outputs(answer.json()["outputs"], reference("member1", x))


def test_unknown_signature_name_is_invalid_argument_on_both_protocols(server, stubs):
    predict, _ = stubs
    x = np.zeros((1, IN_DIM), np.float32)
    with pytest.raises(grpc.RpcError) as caught:
        predict.Predict(predict_request("member0", x, signature="nope"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in caught.value.details()
    answer = requests.post(f"{server.rest}/v1/models/plain0:predict",
                           json={"signature_name": "nope", "instances": x.tolist()}, timeout=30)
    assert answer.status_code == 400 and "nope" in answer.json()["error"]


def test_model_status_lists_the_loaded_versions_on_both_protocols(server, stubs):
    _, models = stubs
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "both_versions"
    status = models.GetModelStatus(request, timeout=30)
    assert sorted(s.version for s in status.model_version_status) == [1, 2]
    assert all(s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
               for s in status.model_version_status)
    answer = requests.get(f"{server.rest}/v1/models/member2", timeout=30).json()
    assert answer == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]}
    answer = requests.get(f"{server.rest}/v1/models/both_versions/versions/2", timeout=30)
    assert [s["version"] for s in answer.json()["model_version_status"]] == ["2"]


def _member_signature(zoo, name):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"],
                                                    f"{zoo['members'][name]}/1")
    return meta.signature_def["serving_default"]


def test_metadata_of_a_member_matches_the_member_signature(server, stubs, zoo):
    predict, _ = stubs
    expected = _member_signature(zoo, "member1")
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "member1"
    response = predict.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    got = signatures.signature_def["serving_default"]
    for got_map, want_map in ((got.inputs, expected.inputs), (got.outputs, expected.outputs)):
        assert set(got_map) == set(want_map)
        for key in want_map:
            assert got_map[key].dtype == want_map[key].dtype
            assert got_map[key].tensor_shape == want_map[key].tensor_shape
    answer = requests.get(f"{server.rest}/v1/models/member1/metadata", timeout=30).json()
    assert answer["model_spec"]["name"] == "member1" and answer["model_spec"]["version"] == "1"
    rest_signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert set(rest_signature["inputs"]) == {"x"}
    assert rest_signature["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert set(rest_signature["outputs"]) == {"logits", "probs"}


def test_newest_version_directory_is_served_and_older_ones_are_not(server, stubs, reference):
    predict, _ = stubs
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    response = predict.Predict(predict_request("versioned", x), timeout=30)
    assert response.model_spec.version.value == 2
    assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                   reference("member1", x))  # version 2 holds member1's model
    with pytest.raises(grpc.RpcError) as caught:
        predict.Predict(predict_request("versioned", x, version=1), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_versions_and_labels_select_the_model_version(server, stubs, reference):
    predict, _ = stubs
    x = RNG.standard_normal((1, IN_DIM)).astype(np.float32)
    old = predict.Predict(predict_request("both_versions", x, version=1), timeout=30)
    assert_outputs({k: tf.make_ndarray(v) for k, v in old.outputs.items()},
                   reference("member0", x))
    stable = predict.Predict(predict_request("both_versions", x, label="stable"), timeout=30)
    assert stable.model_spec.version.value == 1
    answer = requests.post(f"{server.rest}/v1/models/both_versions/labels/canary:predict",
                           json={"inputs": x.tolist()}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert_outputs(answer.json()["outputs"], reference("member1", x))
    answer = requests.post(f"{server.rest}/v1/models/both_versions/labels/nope:predict",
                           json={"inputs": x.tolist()}, timeout=30)
    assert answer.status_code == 400 and "nope" in answer.json()["error"]



def test_version_beyond_int64_in_a_rest_path_is_invalid_argument(server):
    # TF Serving parses the path's version as an int64 and answers 400 when it cannot; a
    # version that merely is not loaded is a 404.
    for huge in ("9" * 25, "9" * 5000):   # 5000 digits: past Python's int() limit too
        answer = requests.post(
            f"{server.rest}/v1/models/both_versions/versions/{huge}:predict",
            json={"inputs": [[0.0] * IN_DIM]}, timeout=30)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == f"Failed to convert version: {huge} to numeric."
        answer = requests.get(f"{server.rest}/v1/models/both_versions/versions/{huge}",
                              timeout=30)
        assert answer.status_code == 400, answer.text
    answer = requests.get(f"{server.rest}/v1/models/both_versions/versions/{2**63 - 1}",
                          timeout=30)
    assert answer.status_code == 404, answer.text


@pytest.mark.parametrize("timeout_ms", ["0", "-1"])
def test_rest_timeout_of_zero_or_less_means_no_deadline(zoo, reference, start_server,
                                                        timeout_ms):
    # TF Serving sets a deadline only for --rest_api_timeout_in_ms > 0; 0 failed every predict
    # at once (504) and -1 dropped every REST connection without an answer.
    served = start_server(["--model_name", "m", "--model_base_path", zoo["members"]["member0"],
                           "--rest_api_timeout_in_ms", timeout_ms])
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    with requests.Session() as session:
        for _ in range(2):   # and the kept-alive connection serves a second request
            answer = session.post(f"{served.rest}/v1/models/m:predict",
                                  json={"inputs": x.tolist()}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert_outputs(answer.json()["outputs"], reference("member0", x))
        assert session.get(f"{served.rest}/v1/models/m", timeout=60).status_code == 200


def test_an_ipv6_host_serves_both_protocols(zoo, reference, start_server):
    # gRPC bound --host ::1 while REST refused to start ("Address family for hostname not
    # supported"): socketserver makes IPv4 sockets unless told otherwise.
    served = start_server(["--host", "::1", "--model_name", "m",
                           "--model_base_path", zoo["members"]["member0"]])
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    answer = requests.post(f"http://[::1]:{served.rest_port}/v1/models/m:predict",
                           json={"inputs": x.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert_outputs(answer.json()["outputs"], reference("member0", x))
    with grpc.insecure_channel(f"[::1]:{served.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            predict_request("m", x), timeout=60)
    assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()},
                   reference("member0", x))

def _raw_http(server, method: str, path: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request whose path goes on the wire as the bytes given (http.client and requests
    would percent-encode or refuse a non-ASCII path)."""
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(method.encode() + b" " + path + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = HTTPResponse(sock, method=method)
        answer.begin()
        return answer.status, answer.read()


def test_non_ascii_model_names_resolve_sent_raw_or_percent_encoded(server, stubs, reference):
    predict, _ = stubs
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    expected = reference("member0", x)
    response = predict.Predict(predict_request(NON_ASCII_NAME, x), timeout=30)
    assert response.model_spec.name == NON_ASCII_NAME
    assert_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()}, expected)
    body = json.dumps({"instances": x.tolist()}).encode()
    encoded = quote(NON_ASCII_NAME).encode()
    assert encoded.isascii()
    for name in (NON_ASCII_NAME.encode("utf-8"), encoded):
        status, answer = _raw_http(server, "POST", b"/v1/models/" + name + b":predict", body)
        assert status == 200, answer
        predictions = json.loads(answer)["predictions"]
        assert_outputs({k: [p[k] for p in predictions] for k in expected}, expected)
        status, answer = _raw_http(server, "GET", b"/v1/models/" + name)
        assert status == 200, answer
        assert json.loads(answer)["model_version_status"][0]["state"] == "AVAILABLE"
        status, answer = _raw_http(server, "GET", b"/v1/models/" + name + b"/metadata")
        assert status == 200, answer
        assert json.loads(answer)["model_spec"]["name"] == NON_ASCII_NAME
    # a name that is not UTF-8 at all is simply not served
    status, answer = _raw_http(server, "GET", b"/v1/models/mod\xe8le")
    assert status == 404 and set(json.loads(answer)) == {"error"}


def test_classify_and_regress_answer_unimplemented(server, stubs):
    predict, _ = stubs
    for call, request in ((predict.Classify, classification_pb2.ClassificationRequest()),
                          (predict.Regress, regression_pb2.RegressionRequest())):
        request.model_spec.name = "member0"
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    answer = requests.post(f"{server.rest}/v1/models/member0:classify",
                           json={"examples": [{"x": 1.0}]}, timeout=30)
    assert answer.status_code == 501 and "error" in answer.json()


def test_prometheus_page_counts_requests_and_merged_batches(server, stubs):
    predict, _ = stubs
    x = np.ones((1, IN_DIM), np.float32)
    for name in ("member0", "member1"):
        predict.Predict(predict_request(name, x), timeout=30)
    page = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=30)
    assert page.status_code == 200
    text = page.text
    line = next(l for l in text.splitlines() if l.startswith(
        ':tensorflow:serving:request_count{model_name="member0",API="predict",'
        'entrypoint="GRPC",status="OK"}'))
    assert int(line.split()[-1]) >= 1
    assert ':tensorflow:serving:request_latency_bucket{model_name="member0"' in text
    assert ':tfweave:serving:batch_size_count{model_name="merged"}' in text
    assert ':tfweave:serving:queue_depth{model_name="merged"}' in text
    busy = next(l for l in text.splitlines()
                if l.startswith(':tfweave:serving:batch_run_seconds{model_name="merged"}'))
    assert float(busy.split()[-1]) > 0   # the merged runs above took some time


def test_requests_for_names_no_model_has_share_one_metrics_series(server, stubs):
    """A client sending made-up model names must not grow the metrics without bound."""
    predict, _ = stubs
    x = np.ones((1, IN_DIM), np.float32)
    names = [f"made_up_{i}" for i in range(5)]
    for name in names:
        with pytest.raises(grpc.RpcError) as caught:
            predict.Predict(predict_request(name, x), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        answer = requests.post(f"{server.rest}/v1/models/{name}:predict",
                               json={"instances": x.tolist()}, timeout=30)
        assert answer.status_code == 404
    text = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=30).text
    assert not any(name in text for name in names)
    counted = {}
    for line in text.splitlines():
        if line.startswith(':tensorflow:serving:request_count{model_name="(not served)",'
                           'API="predict"'):
            entrypoint = line.split('entrypoint="')[1].split('"')[0]
            counted[entrypoint] = int(line.split()[-1])
    assert counted["GRPC"] >= len(names) and counted["REST"] >= len(names)
    # a version a served model does not have is still that model's NOT_FOUND
    with pytest.raises(grpc.RpcError):
        predict.Predict(predict_request("member0", x, version=987), timeout=30)
    text = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=30).text
    assert ('model_name="member0",API="predict",entrypoint="GRPC",status="NOT_FOUND"'
            in text)


def test_server_freezes_its_startup_heap_and_exports_collector_pauses(server, stubs):
    # A full collection over TensorFlow's and the models' objects stalled every request in
    # flight for 100-150 ms; the server moves them out of the collector's view at startup.
    predict, _ = stubs
    x = np.ones((1, IN_DIM), np.float32)

    def metric_lines():
        return requests.get(f"{server.rest}/monitoring/prometheus/metrics",
                            timeout=30).text.splitlines()

    collections = 0
    for _ in range(20):   # serve until the young generation has been collected (bounded)
        for _ in range(50):
            predict.Predict(predict_request("member0", x), timeout=30)
        collections = sum(int(l.split()[-1]) for l in metric_lines()
                          if l.startswith(":tfweave:serving:gc_pause_us_count"))
        if collections:
            break
    assert collections > 0
    frozen = next(l for l in metric_lines()
                  if l.startswith(":tfweave:serving:gc_frozen_objects "))
    assert int(frozen.split()[-1]) > 100_000   # TensorFlow alone leaves more than that
