"""`TensorProto` ↔ numpy without `tf.make_ndarray` / `tf.make_tensor_proto`.

Both TensorFlow helpers are general and slow (they dispatch on every field and copy through
Python lists); a request here is a short list of encoded images or a float matrix, which numpy
converts straight from the proto's `string_val` / `tensor_content` / `*_val` field.

Inputs are checked as TF Serving's C++ `Tensor::FromProto` would reject them — and a little more
strictly: the number of values must equal the number of elements of the declared shape (TF fills
missing values with the last one; a client that meant that is rare, and one that did not gets a
wrong answer).

Nothing is materialised before it is known to fit: `shape_of` and `check_size` read the declared
shape and the proto's own field sizes (no copy), so a caller checks its limits (batch size, bytes)
before `to_ndarray` builds an array.
"""

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from fgkeras.serving.status import invalid_argument

# DataType → (numpy dtype, the TensorProto field holding its values when `tensor_content` is empty).
NUMERIC = {
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    types_pb2.DT_HALF: (np.dtype("<f2"), "half_val"),
    types_pb2.DT_INT8: (np.dtype("i1"), "int_val"),
    types_pb2.DT_INT16: (np.dtype("<i2"), "int_val"),
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    types_pb2.DT_UINT8: (np.dtype("u1"), "int_val"),
    types_pb2.DT_UINT16: (np.dtype("<u2"), "int_val"),
    types_pb2.DT_UINT32: (np.dtype("<u4"), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype("<u8"), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype("?"), "bool_val"),
}
_DTYPE_OF_NUMPY = {dtype: enum for enum, (dtype, _) in NUMERIC.items()}


def dtype_name(enum):
    """`DT_FLOAT`-style name of a DataType enum value (or its number when unknown)."""
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"DataType({enum})"


def shape_of(proto, name):
    """The dimensions of a TensorProto as a tuple; INVALID_ARGUMENT for an unusable shape."""
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"input {name!r} has an unknown rank; send its shape")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise invalid_argument(f"input {name!r} has a negative dimension in its shape {list(shape)}")
    return shape


def check_size(proto, name, shape, max_bytes):
    """The bytes the array of `proto` (of the declared `shape`) will take; INVALID_ARGUMENT over `max_bytes`.

    Numbers take `elements × itemsize`; strings their bytes, which the proto's serialized size
    bounds (protobuf knows it without copying them; a request gRPC accepted is within its limit, a
    warm-up record read from disk need not be). Unsupported dtypes are left to `to_ndarray`.
    """
    if proto.dtype == types_pb2.DT_STRING:
        size = proto.ByteSize()
    elif proto.dtype in NUMERIC:
        size = math.prod(shape) * NUMERIC[proto.dtype][0].itemsize
    else:
        return 0
    if size > max_bytes:
        raise invalid_argument(f"input {name!r} of shape {list(shape)} and dtype {dtype_name(proto.dtype)} takes "
                               f"{size} bytes; the limit is {max_bytes}")
    return size


def to_ndarray(proto, name, max_elements):
    """The numpy array of a request `TensorProto`.

    Strings come back as a 1-D-or-more object array of `bytes`; numbers as a (read-only when
    taken from `tensor_content`) array of the proto's dtype.

    Raises:
        ServingError (INVALID_ARGUMENT): the dtype is not supported, the shape is unusable or does
            not match the number of values, or it has more than `max_elements` elements.
    """
    shape = shape_of(proto, name)
    count = math.prod(shape)
    if count > max_elements:
        raise invalid_argument(f"input {name!r} of shape {list(shape)} has {count} elements; "
                               f"the limit is {max_elements}")
    if proto.dtype == types_pb2.DT_STRING:
        values = proto.string_val
        if len(values) != count:
            raise invalid_argument(f"input {name!r} of shape {list(shape)} needs {count} string values; "
                                   f"it has {len(values)}")
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    if proto.dtype not in NUMERIC:
        raise invalid_argument(f"input {name!r} has dtype {dtype_name(proto.dtype)}, which this server does "
                               "not read")
    dtype, field = NUMERIC[proto.dtype]
    content = proto.tensor_content
    if content:
        if len(content) != count * dtype.itemsize:
            raise invalid_argument(
                f"input {name!r} of shape {list(shape)} and dtype {dtype_name(proto.dtype)} needs "
                f"{count * dtype.itemsize} bytes of tensor_content; it has {len(content)}")
        return np.frombuffer(content, dtype=dtype).reshape(shape)
    values = getattr(proto, field)
    if len(values) != count:
        raise invalid_argument(f"input {name!r} of shape {list(shape)} needs {count} values in {field}; "
                               f"it has {len(values)}")
    if proto.dtype == types_pb2.DT_HALF:  # half_val holds the IEEE bit patterns
        return np.asarray(values, dtype=np.uint16).view(np.float16).reshape(shape)
    if field == "int_val" and dtype.itemsize < 4:  # int_val is int32: narrower types must be range-checked
        wide = np.asarray(values, dtype=np.int64)
        limits = np.iinfo(dtype)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise invalid_argument(f"input {name!r} holds values out of the range of {dtype_name(proto.dtype)}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def fill_proto(proto, array):
    """Writes `array` into the (empty) `TensorProto` `proto`: strings into `string_val`, numbers
    as little-endian `tensor_content` (what TF Serving sends and `tf.make_ndarray` reads)."""
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    if array.dtype.kind in "OSU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend([v.encode() if isinstance(v, str) else bytes(v) for v in array.ravel().tolist()])
        return proto
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    enum = _DTYPE_OF_NUMPY.get(dtype)
    if enum is None:
        raise TypeError(f"Cannot send an array of dtype {array.dtype}")
    proto.dtype = enum
    proto.tensor_content = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return proto


def make_proto(array):
    """A new `TensorProto` holding `array` (see `fill_proto`)."""
    return fill_proto(tensor_pb2.TensorProto(), np.asarray(array))
