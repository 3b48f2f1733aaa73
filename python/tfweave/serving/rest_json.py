"""TF Serving's JSON predict format (util/json_tensor.cc), on numpy arrays.

Request: ``{"signature_name": ..., "instances": [...]}`` (row format: one entry per example,
objects when the signature has several inputs) or ``{"inputs": ...}`` (columnar: one value, or
an object keyed by input name). ``{"b64": "..."}`` carries binary strings. Response:
``{"predictions": [...]}`` for row requests, ``{"outputs": ...}`` for columnar ones; outputs
whose name ends in ``_bytes`` come back base64-encoded. Error messages follow TF Serving's words.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Callable

import numpy as np
from tensorflow.core.framework import types_pb2

from tfweave.serving.status import invalid_argument
from tfweave.serving.tensor_codec import dtype_name, numpy_dtype

ROW, COLUMNAR = "row", "columnar"
# numpy's limit on an array's dimensions, and the largest finite double (JSON ints beyond it
# cannot become a float tensor)
_MAX_RANK = 64
_MAX_DOUBLE = int(np.finfo(np.float64).max)
_FLOATS = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF)
_INTS = (types_pb2.DT_INT8, types_pb2.DT_INT16, types_pb2.DT_INT32, types_pb2.DT_INT64,
         types_pb2.DT_UINT8, types_pb2.DT_UINT16, types_pb2.DT_UINT32, types_pb2.DT_UINT64)


def _json_text(value) -> str:
    try:
        return json.dumps(value, allow_nan=True)[:200]
    except (TypeError, ValueError):
        return repr(value)[:200]


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _type_error(value, enum: int):
    return invalid_argument(f"JSON Value: {_json_text(value)} Type: {_json_type(value)} is not "
                            f"of expected type: {dtype_name(enum)}")


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _decode_b64(value) -> bytes:
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument("Unable to base64 decode") from None


def _dense_shape(value) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _check_leaf(value, enum: int):
    """One scalar of the given dtype, or TF Serving's type error for it."""
    if isinstance(value, dict):
        if enum == types_pb2.DT_STRING and _is_b64(value):
            return _decode_b64(value)
        if enum == types_pb2.DT_STRING:
            raise invalid_argument(f"JSON Value: {_json_text(value)} not formatted correctly "
                                   "for base64 data")
        raise _type_error(value, enum)
    if enum in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, enum)
        if isinstance(value, int) and not -_MAX_DOUBLE <= value <= _MAX_DOUBLE:
            raise invalid_argument(f"JSON Parse error: Number too big to be stored in double: "
                                   f"{_json_text(value)[:40]}...")
        return value
    if enum in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, enum)
        info = np.iinfo(numpy_dtype(enum))
        if not info.min <= value <= info.max:
            raise _type_error(value, enum)
        return value
    if enum == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, enum)
        return value
    if enum == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise _type_error(value, enum)
        try:
            return value.encode()
        except UnicodeEncodeError:   # "\ud800": JSON lets a lone surrogate through, UTF-8 not
            raise invalid_argument("JSON Parse error: The surrogate pair in string is invalid: "
                                   f"{_json_text(value)}") from None
    raise invalid_argument(f"Conversion of JSON Value: {_json_text(value)} to type: "
                           f"{dtype_name(enum)} is not supported")


def _fill(value, level: int, shape: list[int], enum: int, out: list) -> None:
    """Walks a nested list as json_tensor.cc's FillTensorProto does, with its error words."""
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid_argument(
                f"JSON Value: {_json_text(value)} found at incorrect level: {level + 1} in the "
                f"JSON DOM. Expected at level: {len(shape)}")
        out.append(_check_leaf(value, enum))
        return
    if level >= len(shape):
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < "
                               f"{len(shape)}")
    if len(value) != shape[level]:
        raise invalid_argument(f"Encountered list at unexpected size: {len(value)} at level: "
                               f"{level} expected size: {shape[level]}")
    for item in value:
        _fill(item, level + 1, shape, enum, out)


def json_to_array(value, enum: int, *, fast: bool = True) -> np.ndarray:
    """A JSON value (scalar or nested lists) as an array of the signature's dtype.

    ``fast=False`` (the document holds a ``true`` or ``false``) skips numpy's parse, which
    would read a bool beside numbers as 1 or 0 where TF Serving refuses it."""
    dtype = numpy_dtype(enum)
    if fast and enum != types_pb2.DT_STRING:
        # Fast path: numpy parses a well-formed dense list in C; the checks below reproduce
        # the type rules the slow walk enforces, and anything odd takes the slow walk.
        try:
            inferred = np.array(value)
        except (ValueError, TypeError):
            inferred = None
        if inferred is not None and inferred.dtype != object:
            kind = inferred.dtype.kind
            ok = ((enum in _FLOATS and kind in "iuf") or (enum in _INTS and kind in "iu")
                  or (enum == types_pb2.DT_BOOL and kind == "b"))
            if ok and inferred.size:
                if enum in _INTS:
                    info = np.iinfo(dtype)
                    ok = bool(inferred.min() >= info.min and inferred.max() <= info.max)
            if ok:
                return inferred.astype(dtype, copy=False)
    shape = _dense_shape(value)
    if len(shape) > _MAX_RANK:
        raise invalid_argument(f"JSON value nests lists {len(shape)} deep; a tensor has at most "
                               f"{_MAX_RANK} dimensions here")
    leaves: list = []
    _fill(value, 0, shape, enum, leaves)
    array = np.empty(len(leaves), dtype=dtype) if dtype is np.object_ else np.array(
        leaves, dtype=dtype)
    if dtype is np.object_:
        array[:] = leaves
    return array.reshape(shape)


def parse_predict_body(body: bytes,
                       input_dtypes: Callable[[str], dict[str, int]]
                       ) -> tuple[str, dict[str, np.ndarray], str]:
    """Parses a :predict body into (signature_name, inputs, format).

    ``input_dtypes(signature_name)`` returns the signature's input names and dtype enums (it
    raises NOT_FOUND / INVALID_ARGUMENT for an unknown model or signature).
    """
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError as error:
        raise invalid_argument(f"JSON Parse error: Invalid encoding in string. ({error})") \
            from None
    except RecursionError:
        raise invalid_argument("JSON Parse error: the document nests arrays or objects too "
                               "deeply") from None
    except ValueError as error:   # JSONDecodeError, or an integer of over 4300 digits
        raise invalid_argument(f"JSON Parse error: {getattr(error, 'msg', error)} at offset: "
                               f"{getattr(error, 'pos', 0)}") from None
    # A bool beside numbers must meet the type checks (numpy would read it as 1 or 0).
    fast = b"true" not in body and b"false" not in body
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {_json_text(doc)} Is not object")
    signature_name = doc.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid_argument(f"JSON Value: {_json_text(doc)} not formatted correctly. "
                               "'signature_name' key must be a string value.")
    dtypes = input_dtypes(signature_name)
    if not dtypes:
        raise invalid_argument("Failed to get input map for signature: "
                               f"{signature_name or 'DEFAULT'}")
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise invalid_argument(f"JSON Value: {_json_text(doc)} Not formatted correctly expecting "
                               "only one of 'inputs' or 'instances' keys to exist ")
    if has_instances:
        return signature_name, _inputs_from_instances(doc["instances"], dtypes, doc, fast), ROW
    if has_inputs:
        return signature_name, _inputs_from_columns(doc["inputs"], dtypes, fast), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _inputs_from_instances(instances, dtypes: dict[str, int], doc,
                           fast: bool) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise invalid_argument(f"JSON Value: {_json_text(doc)} Excepting 'instances' to be an "
                               "list/array")
    if not instances:
        raise invalid_argument(f"JSON Value: {_json_text(doc)} No values in 'instances' array")
    named = isinstance(instances[0], dict) and not _is_b64(instances[0])
    if not named and len(dtypes) > 1:
        raise invalid_argument("instances is a plain list, but expecting list of objects as "
                               "multiple input tensors required as per tensorinfo_map")
    if not named:
        (name, enum), = dtypes.items()
        for i, item in enumerate(instances):
            if isinstance(item, dict) and not _is_b64(item):
                raise invalid_argument(f"Expecting value/list but got object at item {i} of "
                                       "input list")
        return {name: _stack_instances(instances, name, enum, fast)}
    columns: dict[str, list] = {name: [] for name in dtypes}
    expected = set(dtypes)
    for i, item in enumerate(instances):
        if not isinstance(item, dict) or _is_b64(item):
            raise invalid_argument(f"Expecting object but got list at item {i} of input list")
        if set(item) != expected:
            unknown = sorted(set(item) - expected)
            if unknown:
                raise invalid_argument(
                    f"Failed to process element: {i} key: {unknown[0]} of 'instances' list. "
                    f"Error: INVALID_ARGUMENT: JSON object: does not have named input: "
                    f"{unknown[0]}")
            raise invalid_argument(
                f"Failed to process element: {i} of 'instances' list. JSON object: "
                f"{_json_text(item)} keys must be equal to: {','.join(sorted(expected))}")
        for name in dtypes:
            columns[name].append(item[name])
    return {name: _stack_instances(columns[name], name, dtypes[name], fast) for name in dtypes}


def _stack_instances(values: list, name: str, enum: int, fast: bool) -> np.ndarray:
    try:
        return json_to_array(values, enum, fast=fast)
    except Exception as error:
        # Name the offending example the way TF Serving does (first one that disagrees).
        first_shape = _dense_shape(values[0])
        for i, value in enumerate(values):
            if _dense_shape(value) != first_shape:
                raise invalid_argument(
                    f"Failed to process element: {i} key: {name} of 'instances' list. Error: "
                    f"INVALID_ARGUMENT: Expecting shape {_shape_text(first_shape)} but got: "
                    f"{_shape_text(_dense_shape(value))}") from None
        message = getattr(error, "message", str(error))
        raise invalid_argument(f"Failed to process element of 'instances' list for input "
                               f"{name}. Error: {message}") from None


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _inputs_from_columns(value, dtypes: dict[str, int], fast: bool) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or _is_b64(value):
        if len(dtypes) > 1:
            raise invalid_argument("inputs is a plain value/list, but expecting an object as "
                                   "multiple input tensors required as per tensorinfo_map")
        (name, enum), = dtypes.items()
        return {name: json_to_array(value, enum, fast=fast)}
    arrays = {}
    for name, enum in dtypes.items():
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = json_to_array(value[name], enum, fast=fast)
    return arrays


def _jsonable(array: np.ndarray, as_b64: bool):
    if array.dtype == object or array.dtype.kind in "SU":
        flat = [_string_out(v, as_b64) for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim \
            else flat[0]
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return array.tolist()


def _string_out(value, as_b64: bool):
    raw = value if isinstance(value, bytes) else str(value).encode()
    if as_b64:
        return {"b64": base64.b64encode(raw).decode("ascii")}
    return raw.decode("utf-8", errors="replace")


def _dumps(value) -> bytes:
    # NaN/Infinity as TF Serving writes them (rapidjson's kParseNanAndInfFlag spelling).
    return json.dumps(value, allow_nan=True, separators=(",", ":")).encode()


def format_predict_response(outputs: dict[str, np.ndarray], fmt: str) -> bytes:
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            return _dumps({"outputs": _jsonable(outputs[names[0]],
                                                names[0].endswith("_bytes"))})
        return _dumps({"outputs": {n: _jsonable(outputs[n], n.endswith("_bytes"))
                                   for n in names}})
    batch = None
    for name in names:
        array = outputs[name]
        if array.ndim == 0:
            raise invalid_argument(f"Tensor name: {name} has no shape information ")
        if batch is not None and array.shape[0] != batch:
            raise invalid_argument(f"Tensor name: {name} has inconsistent batch size: "
                                   f"{array.shape[0]} expecting: {batch}")
        batch = array.shape[0]
    if len(names) == 1:
        return _dumps({"predictions": _jsonable(outputs[names[0]],
                                                names[0].endswith("_bytes"))})
    columns = {n: _jsonable(outputs[n], n.endswith("_bytes")) for n in names}
    return _dumps({"predictions": [{n: columns[n][i] for n in names} for i in range(batch)]})


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


__all__ = ["COLUMNAR", "ROW", "error_body", "format_predict_response", "json_to_array",
           "parse_predict_body"]
