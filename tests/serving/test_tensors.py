import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from fgkeras.serving import ServingError
from fgkeras.serving.images import encode_png
from fgkeras.serving.tensors import make_proto, to_ndarray


@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.arange(4, dtype=np.int32),
    np.arange(4, dtype=np.int64).reshape(2, 2),
    np.array([[0, 255]], dtype=np.uint8),
    np.array([True, False]),
    np.array([0.5, -1.5], dtype=np.float16),
    np.array([1.25], dtype=np.float64),
    np.array(7, dtype=np.int32),
])
def test_numeric_round_trip_matches_tensorflow(value):
    # what TF's own helpers would send (typed fields or tensor_content), read back without them
    sent = tf.make_tensor_proto(value)
    np.testing.assert_array_equal(to_ndarray(sent, "x", 1 << 20), value)
    ours = make_proto(value)
    assert ours.dtype == sent.dtype
    np.testing.assert_array_equal(tf.make_ndarray(ours), value)


def test_strings_round_trip():
    value = np.array([[b"a", b""], [b"\x00\xff", b"xyz"]], dtype=object)
    parsed = to_ndarray(tf.make_tensor_proto(value), "s", 100)
    assert parsed.shape == (2, 2) and parsed.tolist() == value.tolist()
    back = tf.make_ndarray(make_proto(np.array(["sku-1", "sku-2"], dtype=object)))
    assert back.tolist() == [b"sku-1", b"sku-2"]


@pytest.mark.parametrize("proto, message", [
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0]), "needs 1 values"),  # shape [] = 1 value
    (tf.make_tensor_proto(np.zeros(3, np.float32)), None),
])
def test_value_count_must_match_shape(proto, message):
    if message is None:
        assert to_ndarray(proto, "x", 10).shape == (3,)
        proto.tensor_content = proto.tensor_content[:-1]
        message = "needs 12 bytes"
    with pytest.raises(ServingError) as error:
        to_ndarray(proto, "x", 10)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.message


def test_huge_declared_shape_is_refused_before_allocating():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in (100000, 100000, 100000):
        proto.tensor_shape.dim.add().size = size
    with pytest.raises(ServingError, match="elements; the limit is"):
        to_ndarray(proto, "x", 1 << 20)


def test_unsupported_dtype_and_out_of_range_values():
    with pytest.raises(ServingError, match="DT_COMPLEX64"):
        to_ndarray(tf.make_tensor_proto(np.zeros(2, np.complex64)), "x", 10)
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, int_val=[300])
    proto.tensor_shape.dim.add().size = 1
    with pytest.raises(ServingError, match="out of the range"):
        to_ndarray(proto, "x", 10)


def test_encode_png_checks_arrays():
    assert tf.io.decode_png(encode_png(np.zeros((4, 5), np.uint8))).shape == (4, 5, 1)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 5, 2), np.uint8))
