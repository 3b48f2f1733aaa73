"""TF Serving's JSON tensor format (json_tensor.cc) on numpy arrays, in-process."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2

from tfweave.serving.rest_json import (COLUMNAR, ROW, format_predict_response,
                                       parse_predict_body)
from tfweave.serving.status import ServingError

FLOAT, STRING, INT = types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_INT64


def _parse(doc, dtypes):
    return parse_predict_body(json.dumps(doc).encode(), lambda sig: dtypes)


def test_row_format_stacks_instances_along_the_batch_dimension():
    _, inputs, fmt = _parse({"instances": [[1, 2], [3, 4.5]]}, {"x": FLOAT})
    assert fmt == ROW
    np.testing.assert_array_equal(inputs["x"], np.array([[1, 2], [3, 4.5]], np.float32))
    _, inputs, _ = _parse({"instances": [{"a": 1, "b": [1.0]}, {"a": 2, "b": [2.0]}]},
                          {"a": INT, "b": FLOAT})
    assert inputs["a"].dtype == np.int64 and inputs["b"].shape == (2, 1)


def test_b64_objects_decode_to_bytes_and_bytes_outputs_encode_back():
    raw = [b"\x00\xffbinary", b"text"]
    doc = {"signature_name": "s",
           "inputs": {"img_bytes": [{"b64": base64.b64encode(r).decode()} for r in raw]}}
    signature, inputs, fmt = _parse(doc, {"img_bytes": STRING})
    assert signature == "s" and fmt == COLUMNAR
    assert list(inputs["img_bytes"]) == raw
    out = json.loads(format_predict_response(
        {"img_bytes": inputs["img_bytes"], "n": np.array([1, 2])}, ROW))
    assert [base64.b64decode(p["img_bytes"]["b64"]) for p in out["predictions"]] == raw


def test_response_shapes_follow_tf_serving():
    one = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    assert json.loads(format_predict_response(one, ROW)) == {"predictions": [[1, 2], [3, 4]]}
    assert json.loads(format_predict_response(one, COLUMNAR)) == {"outputs": [[1, 2], [3, 4]]}
    two = dict(one, z=np.array([5, 6]))
    assert json.loads(format_predict_response(two, ROW)) == {
        "predictions": [{"y": [1, 2], "z": 5}, {"y": [3, 4], "z": 6}]}
    with pytest.raises(ServingError, match="inconsistent batch size"):
        format_predict_response(dict(one, z=np.array([1, 2, 3])), ROW)


@pytest.mark.parametrize("doc, dtypes, words", [
    ({"instances": [[1.5]]}, {"x": INT}, "is not of expected type: int64"),
    ({"instances": [[True]]}, {"x": FLOAT}, "is not of expected type: float"),
    ({"instances": [[1], [1, 2]]}, {"x": FLOAT}, "Expecting shape"),
    ({"inputs": [[1], [1, 2]]}, {"x": FLOAT}, "unexpected size"),
    ({"instances": [1]}, {"x": FLOAT, "y": FLOAT}, "list of objects"),
    ({"instances": [{"x": 1, "q": 2}]}, {"x": FLOAT}, "does not have named input: q"),
    ({"inputs": {"x": [{"b64": "!!"}]}}, {"x": STRING}, "base64"),
    ({"signature_name": 3, "inputs": [1]}, {"x": FLOAT}, "'signature_name' key must be"),
])
def test_bad_json_values_get_tf_servings_messages(doc, dtypes, words):
    with pytest.raises(ServingError, match=words) as caught:
        _parse(doc, dtypes)
    assert caught.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("body, dtypes, words", [
    # a bool beside numbers: numpy would read it as 1 or 0; TF Serving refuses it
    (b'{"instances": [[true, 2, 3]]}', {"x": FLOAT}, "true Type: True is not of expected type"),
    (b'{"inputs": {"x": [[1, 2, 3]], "k": [false, 5]}}', {"x": FLOAT, "k": INT},
     "false Type: False is not of expected type: int64"),
    # an integer no double can hold, and one of more digits than Python converts
    (b'{"inputs": [[1%s, 2]]}' % (b"0" * 400), {"x": FLOAT}, "Number too big"),
    (b'{"inputs": [[1%s, 2]]}' % (b"0" * 5000), {"x": FLOAT}, "JSON Parse error: Exceeds"),
    # lists deeper than a tensor can be, and a document deeper than the parser goes
    (b'{"inputs": %s1%s}' % (b"[" * 70, b"]" * 70), {"x": FLOAT}, "70 deep"),
    (b'{"inputs": %s1%s}' % (b"[" * 100000, b"]" * 100000), {"x": FLOAT}, "too deeply"),
    # a lone UTF-16 surrogate is valid JSON but no UTF-8 string
    (b'{"inputs": ["\\ud800"]}', {"x": STRING}, "surrogate"),
])
def test_json_that_python_reads_but_no_tensor_holds_is_refused_as_tf_serving_does(
        body, dtypes, words):
    with pytest.raises(ServingError, match=words) as caught:
        parse_predict_body(body, lambda sig: dtypes)
    assert caught.value.code == "INVALID_ARGUMENT"


def test_bools_in_a_document_leave_the_numbers_beside_them_exact():
    """The check that refuses bools takes the slow walk; numbers must come out the same."""
    body = b'{"inputs": {"x": [[1, 2.5, 3]], "flag": [true]}}'
    _, inputs, _ = parse_predict_body(body, lambda sig: {"x": FLOAT, "flag": types_pb2.DT_BOOL})
    np.testing.assert_array_equal(inputs["x"], np.array([[1, 2.5, 3]], np.float32))
    assert inputs["flag"].tolist() == [True]


def test_an_unexpected_fault_is_answered_internal_not_with_a_dropped_connection():
    from tfweave.serving.metrics import Metrics
    from tfweave.serving.rest_api import RestApi

    class Broken:
        def input_dtypes(self, *args):
            raise KeyError("a bug of ours")

    metrics = Metrics()
    api = RestApi(Broken(), metrics, max_request_bytes=1 << 20, timeout_s=5.0)
    status, content_type, body = api.handle("POST", "/v1/models/m:predict",
                                            lambda: b'{"instances": [[1.0]]}')
    assert status == 500 and content_type == "application/json"
    assert "KeyError" in json.loads(body)["error"]
    assert 'status="INTERNAL"' in metrics.render()
