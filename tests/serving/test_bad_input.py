"""Bad requests get TF Serving's error code and shape, and the server keeps serving.

Every test sends a good request before and after its bad one (``assert_serving``), over both
protocols, so a bad request that broke the server (a dead thread, a poisoned batch, a desynced
keep-alive connection) fails the test that sent it.
"""

from __future__ import annotations

import json
import socket
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.serving.model_fixtures import IN_DIM, write_text

MAX_REQUEST_BYTES = 64 * 1024
# A lone request waits this long for its batch to fill, so the server always holds a call for
# at least this long: a client deadline well below it passes while the server holds the call.
BATCH_TIMEOUT_S = 0.05


@pytest.fixture(scope="module")
def server(zoo, start_server, tmp_path_factory):
    batching = write_text(tmp_path_factory.mktemp("bad_input") / "batching.config", f"""
max_batch_size {{ value: 64 }}
batch_timeout_micros {{ value: {int(BATCH_TIMEOUT_S * 1e6)} }}
num_batch_threads {{ value: 2 }}
""")
    return start_server(["--model_name", "merged", "--model_base_path", zoo["merged"],
                         "--enable_batching", "--batching_parameters_file", batching,
                         "--max_request_bytes", str(MAX_REQUEST_BYTES)])


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def http(server):
    session = requests.Session()   # keep-alive: a desynced connection would show up
    yield session
    session.close()


def _request(name="member0", x=None, **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if x is not None:
        inputs["x"] = x
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


@pytest.fixture
def assert_serving(server, stub, http, reference):
    rng = np.random.default_rng(7)

    def check():
        assert server.alive()
        x = rng.standard_normal((2, IN_DIM)).astype(np.float32)
        expected = reference("member2", x)
        response = stub.Predict(_request("member2", x), timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                                   expected["logits"], rtol=1e-5, atol=1e-6)
        answer = http.post(f"{server.rest}/v1/models/member2:predict",
                           json={"instances": x.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose([p["logits"] for p in answer.json()["predictions"]],
                                   expected["logits"], rtol=1e-5, atol=1e-6)

    check()
    yield check
    check()


def _grpc_error(call, request) -> grpc.RpcError:
    return _grpc_error_with_timeout(call, request, 30)


def _grpc_error_with_timeout(call, request, timeout) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=timeout)
    return caught.value


def _rest_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def test_unknown_model_is_not_found(server, stub, http, assert_serving):
    error = _grpc_error(stub.Predict, _request("nope", np.zeros((1, IN_DIM), np.float32)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in error.details()
    message = _rest_error(http.post(f"{server.rest}/v1/models/nope:predict",
                                    json={"instances": [[0.0] * IN_DIM]}), 404)
    assert "nope" in message
    _rest_error(http.get(f"{server.rest}/v1/models/nope"), 404)


def test_unknown_version_is_not_found(server, stub, http, assert_serving):
    request = _request("member0", np.zeros((1, IN_DIM), np.float32))
    request.model_spec.version.value = 7
    error = _grpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    _rest_error(http.post(f"{server.rest}/v1/models/member0/versions/7:predict",
                          json={"instances": [[0.0] * IN_DIM]}), 404)
    _rest_error(http.get(f"{server.rest}/v1/models/member0/versions/7"), 404)


def test_wrong_dtype_is_invalid_argument(server, stub, http, assert_serving):
    error = _grpc_error(stub.Predict, _request("member0", np.zeros((1, IN_DIM), np.int32)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "to be float but int32 is provided" in error.details()
    message = _rest_error(http.post(f"{server.rest}/v1/models/member0:predict",
                                    json={"instances": [["a"] * IN_DIM]}), 400)
    assert "is not of expected type: float" in message


def test_wrong_shape_is_invalid_argument(server, stub, http, assert_serving):
    error = _grpc_error(stub.Predict, _request("member1", np.zeros((2, IN_DIM + 1), np.float32)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape" in error.details()
    ragged = {"instances": [[0.0] * IN_DIM, [0.0] * (IN_DIM - 1)]}
    message = _rest_error(http.post(f"{server.rest}/v1/models/member1:predict", json=ragged),
                          400)
    assert "Expecting shape" in message
    _rest_error(http.post(f"{server.rest}/v1/models/member1:predict",
                          json={"inputs": [[0.0] * (IN_DIM + 1)]}), 400)


def test_missing_and_extra_inputs_are_invalid_argument(server, stub, http, assert_serving):
    error = _grpc_error(stub.Predict, _request("member0"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Missing but required: {x}" in error.details()
    x = np.zeros((1, IN_DIM), np.float32)
    error = _grpc_error(stub.Predict, _request("member0", x, y=x))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Sent extra: {y}" in error.details()
    message = _rest_error(http.post(f"{server.rest}/v1/models/member0:predict",
                                    json={"inputs": {"z": [[0.0] * IN_DIM]}}), 400)
    assert "Missing named input: x" in message
    message = _rest_error(http.post(f"{server.rest}/v1/models/member0:predict",
                                    json={"signature_name": "serving_default"}), 400)
    assert "Missing 'inputs' or 'instances' key" in message


def test_malformed_json_is_invalid_argument(server, http, assert_serving):
    url = f"{server.rest}/v1/models/member0:predict"
    assert "JSON Parse error" in _rest_error(http.post(url, data=b'{"instances": [1,'), 400)
    assert "JSON Parse error" in _rest_error(http.post(url, data=b""), 400)
    assert "Is not object" in _rest_error(http.post(url, data=b"[1, 2]"), 400)
    both = {"instances": [[0.0] * IN_DIM], "inputs": [[0.0] * IN_DIM]}
    assert "only one of" in _rest_error(http.post(url, json=both), 400)
    _rest_error(http.post(url, data=json.dumps({"instances": []})), 400)


def test_malformed_protobuf_fails_the_call_and_not_the_server(server, assert_serving):
    channel = grpc.insecure_channel(server.grpc)
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                              request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff\x0f garbage that is not a PredictRequest", timeout=30)
    assert caught.value.code() != grpc.StatusCode.OK
    # A well-formed message whose tensor content contradicts its shape.
    request = _request("member0", np.zeros((1, IN_DIM), np.float32))
    request.inputs["x"].tensor_content = b"\x00" * 5
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    error = _grpc_error(stub.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor parsing error" in error.details()
    channel.close()


def test_oversized_payload_is_rejected_on_both_protocols(server, stub, http, assert_serving):
    rows = MAX_REQUEST_BYTES // (4 * IN_DIM) + 100
    big = np.zeros((rows, IN_DIM), np.float32)
    error = _grpc_error(stub.Predict, _request("member0", big))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = _rest_error(http.post(f"{server.rest}/v1/models/member0:predict",
                                    json={"instances": big.tolist()}), 413)
    assert "max_request_bytes" in message


def test_unknown_rest_paths_answer_tf_servings_error_shape(server, http, assert_serving):
    _rest_error(http.get(f"{server.rest}/v1/models"), 400)
    _rest_error(http.post(f"{server.rest}/v1/models/member0:explain", json={}), 400)
    assert http.get(f"{server.rest}/not/v1").status_code == 404


def test_gzip_bodies_are_uncompressed_as_tf_serving_does_within_the_size_limit(
        server, http, reference, assert_serving):
    import gzip

    x = np.random.default_rng(3).standard_normal((2, IN_DIM)).astype(np.float32)
    url = f"{server.rest}/v1/models/member1:predict"
    body = gzip.compress(json.dumps({"instances": x.tolist()}).encode())
    answer = http.post(url, data=body, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose([p["logits"] for p in answer.json()["predictions"]],
                               reference("member1", x)["logits"], rtol=1e-5, atol=1e-6)
    assert "gzip" in _rest_error(http.post(url, data=b"not gzip at all",
                                           headers={"Content-Encoding": "gzip"}), 400)
    assert "ends early" in _rest_error(http.post(url, data=body[:-12],
                                                 headers={"Content-Encoding": "gzip"}), 400)
    # a small body that inflates past --max_request_bytes is refused like a big one
    bomb = gzip.compress(b" " * (4 * MAX_REQUEST_BYTES))
    assert len(bomb) < MAX_REQUEST_BYTES
    assert "max_request_bytes" in _rest_error(
        http.post(url, data=bomb, headers={"Content-Encoding": "gzip"}), 413)


@pytest.mark.parametrize("header", [b"Content-Length: -1", b"Content-Length: -2",
                                    b"Transfer-Encoding: chunked"])
def test_negative_body_lengths_are_bad_requests_answered_at_once(server, header,
                                                                 assert_serving):
    """A negative length would read to the end of the stream, past every limit, and leave
    the client waiting for an answer."""
    body = b"-1\r\n" + b"x" * 64 if b"chunked" in header else b"{}"
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/models/member0:predict HTTP/1.1\r\nHost: x\r\n" + header
                     + b"\r\n\r\n" + body)   # and the connection stays open
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def _raw_http(server, data: bytes, *, read_answer: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(data)
        if not read_answer:
            return b""
        return sock.recv(65536)


def test_clients_that_disconnect_mid_request_do_not_hurt_others(server, stub, assert_serving):
    body = json.dumps({"instances": [[0.5] * IN_DIM]}).encode()
    head = (b"POST /v1/models/member1:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: ")
    # 1) gone in the middle of the body
    _raw_http(server, head + b"5000\r\n\r\n" + body[:20], read_answer=False)
    # 2) gone in the middle of the headers
    _raw_http(server, head[:30], read_answer=False)
    # 3) a whole request, gone before reading the answer
    _raw_http(server, head + str(len(body)).encode() + b"\r\n\r\n" + body, read_answer=False)
    # 4) gRPC calls abandoned by their clients, queued or running
    x = np.zeros((1, IN_DIM), np.float32)
    futures = [stub.Predict.future(_request("member1", x), timeout=30) for _ in range(20)]
    for future in futures:
        future.cancel()
    # A call whose deadline passes while the server holds it (waiting for its batch). A
    # sub-millisecond deadline is no test: gRPC's client timer loses the race against a fast
    # loopback answer most of the time, so the server's batch timeout sets the hold instead.
    # First let the abandoned calls' batch run, so this call starts a batch of its own.
    time.sleep(2 * BATCH_TIMEOUT_S)
    error = _grpc_error_with_timeout(stub.Predict, _request("member1", x), BATCH_TIMEOUT_S / 10)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)
    # A pipelined keep-alive exchange still works byte for byte.
    answer = _raw_http(server, head + str(len(body)).encode() + b"\r\n\r\n" + body,
                       read_answer=True)
    assert answer.startswith(b"HTTP/1.1 200")


def test_idle_keep_alive_connections_make_way_while_busy_ones_hold_the_cap(
        zoo, start_server, reference):
    """--rest_api_num_threads caps the connections being served. A keep-alive client holds
    its connection between requests; at the cap such an idle one is closed for a new client
    (which TF Serving would also serve), and its own next request reconnects. Connections in
    the middle of a request are never closed: beyond them a new one gets 503 at once."""
    server = start_server(["--model_name", "merged", "--model_base_path", zoo["merged"],
                           "--rest_api_num_threads", "2"])
    x = np.random.default_rng(5).standard_normal((1, IN_DIM)).astype(np.float32)
    url = f"{server.rest}/v1/models/member0:predict"
    expected = reference("member0", x)["logits"]

    def ask(session):
        answer = session.post(url, json={"instances": x.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["predictions"][0]["logits"], expected[0],
                                   rtol=1e-5, atol=1e-6)

    sessions = [requests.Session() for _ in range(4)]
    try:
        for session in sessions:   # each leaves an idle keep-alive connection behind
            ask(session)
        for session in sessions:   # and each comes back on it, or on a new one
            ask(session)
        # two clients stuck mid-request (headers sent, body not) hold both places
        # (one after the other: a connection that has sent nothing yet is idle, and the
        # next one would close it)
        stuck = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
            sock.sendall(b"POST /v1/models/member0:predict HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            stuck.append(sock)
            time.sleep(1.0)   # its thread starts and reads the request line
        refused = requests.post(url, json={"instances": x.tolist()}, timeout=30)
        assert refused.status_code == 503 and "rest_api_num_threads" in refused.json()["error"]
        for sock in stuck:
            sock.close()
        deadline = time.monotonic() + 30
        while True:   # their threads notice the closed sockets and leave
            answer = requests.post(url, json={"instances": x.tolist()}, timeout=30)
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text
    finally:
        for session in sessions:
            session.close()
    assert server.alive()


@pytest.mark.parametrize("method", ["PATCH", "OPTIONS", "TRACE", "BREW"])
def test_any_method_gets_tf_servings_json_error_not_an_html_page(
        server, http, method, assert_serving):
    """http.server answers a method it has no ``do_<METHOD>`` for with an HTML 501 page; TF
    Serving answers a method a path does not take as a malformed request, in its JSON shape."""
    for path in ("/v1/models/member0:predict", "/v1/models/member0",
                 "/v1/models/member0/versions/1/metadata", "/v1/elsewhere"):
        answer = http.request(method, f"{server.rest}{path}", timeout=30)
        assert f"Malformed request: {method} {path}" in _rest_error(answer, 400)
    _rest_error(http.request(method, f"{server.rest}/elsewhere", timeout=30), 404)


def _read_head(answer) -> tuple[bytes, dict[str, str]]:
    """An answer's status line and headers, read from a socket's file."""
    status, headers = answer.readline(), {}
    while (line := answer.readline()) not in (b"\r\n", b""):
        key, value = line.decode().split(":", 1)
        headers[key.strip().lower()] = value.strip()
    return status, headers


def test_head_gets_an_error_status_without_a_body_and_the_connection_goes_on(server,
                                                                             assert_serving):
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        answer = sock.makefile("rb")
        sock.sendall(b"HEAD /v1/models/member0 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers = _read_head(answer)
        assert status.startswith(b"HTTP/1.1 400"), status
        assert headers["content-type"] == "application/json"
        assert "close" not in headers.get("connection", "")
        # on the same connection: a body sent after the HEAD answer would be read here
        sock.sendall(b"GET /v1/models/member0 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers = _read_head(answer)
        assert status.startswith(b"HTTP/1.1 200"), status
        body = json.loads(answer.read(int(headers["content-length"])))
        assert body["model_version_status"][0]["state"] == "AVAILABLE"


def test_repeated_values_beyond_the_shape_are_dropped_as_tensorflows_from_proto_does(
        server, stub, reference, assert_serving):
    """TF Serving decodes inputs with Tensor::FromProto, which takes the first values a shape
    needs from ``float_val`` and ignores the rest (and repeats the last one when there are
    too few); ``tf.io.parse_tensor`` runs the same FromProto here as the reference."""
    values = np.arange(2 * IN_DIM + 5, dtype=np.float32) / 10
    for count in (2 * IN_DIM + 5, 2 * IN_DIM + 1, 3):
        request = _request("member0")
        proto = request.inputs["x"]
        proto.dtype = tf.float32.as_datatype_enum
        proto.tensor_shape.dim.add(size=2)
        proto.tensor_shape.dim.add(size=IN_DIM)
        proto.float_val.extend(values[:count].tolist())
        decoded_by_tf = tf.io.parse_tensor(proto.SerializeToString(), tf.float32).numpy()
        response = stub.Predict(request, timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                                   reference("member0", decoded_by_tf)["logits"],
                                   rtol=1e-5, atol=1e-6, err_msg=f"{count} values")
