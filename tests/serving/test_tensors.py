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


def _signature():
    from tensorflow.core.protobuf import meta_graph_pb2

    from fgkeras.serving.signatures import PREDICT_METHOD, Signature, tensor_info

    signature_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    signature_def.inputs["images"].CopyFrom(tensor_info("images:0", types_pb2.DT_STRING, [-1]))
    signature_def.inputs["weights"].CopyFrom(tensor_info("weights:0", types_pb2.DT_FLOAT, [-1, -1]))
    signature_def.outputs["out"].CopyFrom(tensor_info("out:0", types_pb2.DT_FLOAT, [-1]))
    return Signature("sig", signature_def)


def _declared(dtype, shape, **values):
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    return proto


def test_parse_checks_batch_size_and_bytes_from_the_declared_shape_before_reading_values(monkeypatch):
    from fgkeras.serving import Limits, tensors

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("a value was materialised before the limits were checked")

    monkeypatch.setattr(tensors, "to_ndarray", must_not_be_called)
    signature, limits = _signature(), Limits(max_request_bytes=1 << 20, max_request_batch_size=8)
    png = encode_png(np.zeros((2, 2, 3), np.uint8))
    cases = [
        # 300 rows declared, no value sent: the batch size is what is wrong, and nothing is read
        ({"images": _declared(types_pb2.DT_STRING, [300]), "weights": _declared(types_pb2.DT_FLOAT, [300, 1])},
         "a batch of 300 exceeds the server's max_request_batch_size of 8"),
        # 8 rows of 100,000 floats: 3.2 MB of array for a request of a few bytes
        ({"images": _declared(types_pb2.DT_STRING, [8], string_val=[png] * 8),
          "weights": _declared(types_pb2.DT_FLOAT, [8, 100000])}, "takes 3200000 bytes; the limit is 1048576"),
        ({"images": _declared(types_pb2.DT_STRING, [2], string_val=[png] * 2),
          "weights": _declared(types_pb2.DT_FLOAT, [3, 1])}, "must have the same batch size"),
        ({"images": _declared(types_pb2.DT_STRING, [0]), "weights": _declared(types_pb2.DT_FLOAT, [0, 4])},
         "empty batch"),
        ({"images": _declared(types_pb2.DT_STRING, [2, 1]), "weights": _declared(types_pb2.DT_FLOAT, [2, 1])},
         "must have shape [None]"),
    ]
    for inputs, message in cases:
        with pytest.raises(ServingError) as error:
            signature.parse(inputs, limits)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.message, \
            error.value.message


def test_parse_reads_a_request_that_fits():
    from fgkeras.serving import Limits

    png = encode_png(np.zeros((2, 2, 3), np.uint8))
    inputs = {"images": make_proto(np.array([png, png], dtype=object)),
              "weights": make_proto(np.ones((2, 3), np.float32))}
    payload, rows = _signature().parse(inputs, Limits())
    assert rows == 2 and payload["images"].tolist() == [png, png] and payload["weights"].shape == (2, 3)
    with pytest.raises(ServingError, match="needs 2 string values; it has 1"):
        _signature().parse({**inputs, "images": _declared(types_pb2.DT_STRING, [2], string_val=[png])}, Limits())


def test_check_size_counts_numbers_from_the_shape_and_strings_from_the_proto():
    from fgkeras.serving.tensors import check_size

    floats = _declared(types_pb2.DT_FLOAT, [1000, 1000])
    assert check_size(floats, "x", (1000, 1000), 4_000_000) == 4_000_000
    with pytest.raises(ServingError, match="takes 4000000 bytes; the limit is 3999999"):
        check_size(floats, "x", (1000, 1000), 3_999_999)
    strings = _declared(types_pb2.DT_STRING, [2], string_val=[b"a" * 1000, b"b" * 1000])
    assert 2000 < check_size(strings, "s", (2,), 2100) <= 2100  # a request near the limit still fits
    with pytest.raises(ServingError, match="bytes; the limit is 1999"):
        check_size(strings, "s", (2,), 1999)


def test_the_pixel_budget_is_the_requests_over_all_its_image_inputs():
    from tensorflow.core.protobuf import meta_graph_pb2

    from fgkeras.serving import Limits
    from fgkeras.serving.signatures import PREDICT_METHOD, Signature, tensor_info

    signature_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for key in ("query_images", "gallery_images"):
        signature_def.inputs[key].CopyFrom(tensor_info(f"{key}:0", types_pb2.DT_STRING, [-1]))
    signature_def.outputs["out"].CopyFrom(tensor_info("out:0", types_pb2.DT_FLOAT, [-1]))
    png = encode_png(np.zeros((10, 10, 3), np.uint8))  # 100 pixels
    inputs = {key: make_proto(np.array([png] * 3, dtype=object)) for key in signature_def.inputs}
    assert Signature("pair", signature_def).parse(inputs, Limits(max_pixels_per_request=600))[1] == 3
    with pytest.raises(ServingError, match=r"query_images\[0..2\] decode to 600 pixels \(with 300 of the request's "
                                           r"other images\), over the server's max_pixels_per_request of 599"):
        Signature("pair", signature_def).parse(inputs, Limits(max_pixels_per_request=599))
