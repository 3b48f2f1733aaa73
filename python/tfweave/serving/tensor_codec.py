"""numpy arrays <-> TensorProto, and the dtype names TF's own error messages use.

Numeric tensors go out as ``tensor_content`` (one bytes copy instead of a repeated field per
value); incoming protos may use either form and decode as TF Serving's ``Tensor::FromProto``
does: ``tensor_content`` must match the shape exactly (else INVALID_ARGUMENT naming the input),
while a repeated ``*_val`` field gives the first values the shape needs, the rest ignored, and
too few repeat the last one.
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from tfweave.serving.status import invalid_argument

_NUMPY_BY_ENUM = {
    types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64,
    types_pb2.DT_HALF: np.float16, types_pb2.DT_INT8: np.int8, types_pb2.DT_INT16: np.int16,
    types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64, types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_UINT16: np.uint16, types_pb2.DT_UINT32: np.uint32,
    types_pb2.DT_UINT64: np.uint64, types_pb2.DT_BOOL: np.bool_,
    types_pb2.DT_STRING: np.object_,
}
_ENUM_BY_NUMPY = {np.dtype(v): k for k, v in _NUMPY_BY_ENUM.items() if v is not np.object_}
# The repeated field that holds a tensor's values when it has no tensor_content (tensor.proto).
_VALUES_FIELD = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_HALF: "half_val", types_pb2.DT_INT8: "int_val", types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT8: "int_val", types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val", types_pb2.DT_STRING: "string_val",
}


def dtype_name(enum: int) -> str:
    """TF's DataTypeString: DT_FLOAT -> "float", as in "Expects arg[0] to be float"."""
    try:
        return types_pb2.DataType.Name(enum)[3:].lower()
    except ValueError:
        return f"dtype {enum}"


def numpy_dtype(enum: int):
    try:
        return _NUMPY_BY_ENUM[enum]
    except KeyError:
        raise invalid_argument(f"tensors of type {dtype_name(enum)} are not served") from None


def dtype_enum_of(array: np.ndarray) -> int:
    if array.dtype.kind in "OSU":
        return types_pb2.DT_STRING
    try:
        return _ENUM_BY_NUMPY[array.dtype]
    except KeyError:
        raise invalid_argument(f"output of numpy type {array.dtype} cannot be sent") from None


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    enum = dtype_enum_of(array)
    proto = tensor_pb2.TensorProto(
        dtype=enum, tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]))
    if enum == types_pb2.DT_STRING:
        proto.string_val.extend(
            v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    else:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def from_tensor_proto(proto: tensor_pb2.TensorProto, what: str) -> np.ndarray:
    """Decodes one request tensor; ``what`` names it in errors (e.g. "input 'x'")."""
    shape_proto = proto.tensor_shape
    if shape_proto.unknown_rank or any(d.size < 0 for d in shape_proto.dim):
        raise invalid_argument(f"tensor parsing error: {what} has an unknown or negative "
                               "dimension; send a fully defined shape")
    shape = tuple(int(d.size) for d in shape_proto.dim)
    dtype = numpy_dtype(proto.dtype)
    count = math.prod(shape)
    if proto.tensor_content and dtype is not np.object_:
        itemsize = np.dtype(dtype).itemsize
        if len(proto.tensor_content) != count * itemsize:
            raise invalid_argument(
                f"tensor parsing error: {what}: tensor_content holds "
                f"{len(proto.tensor_content)} bytes but shape {list(shape)} of "
                f"{dtype_name(proto.dtype)} needs {count * itemsize}")
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    values = getattr(proto, _VALUES_FIELD[proto.dtype])
    if len(values) > count:
        # tf.make_ndarray refuses extra values where FromProto (TF Serving) ignores them
        trimmed = tensor_pb2.TensorProto()
        trimmed.CopyFrom(proto)
        del getattr(trimmed, _VALUES_FIELD[proto.dtype])[count:]
        proto = trimmed
    from tensorflow.python.framework import tensor_util
    try:
        array = tensor_util.MakeNdarray(proto)
    except Exception as error:  # malformed repeated fields: say which input, keep serving
        raise invalid_argument(f"tensor parsing error: {what}: {error}") from None
    if array.shape != shape:
        raise invalid_argument(f"tensor parsing error: {what}: values do not fill shape "
                               f"{list(shape)}")
    return array
