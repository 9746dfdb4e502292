import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras.data import SyntheticVehicles
from fgkeras.export import TFLiteEmbedder, convert_tflite, export_tflite, tflite_parity
from fgkeras.export.saved_model import EmbedderModule
from fgkeras.layers import L2Normalize
from fgkeras.models import build_embedder

SIZE, DIM = 32, 16
# Measured: fp32 TFLite vs Keras max |diff| 9e-7 on these images, 1.3e-6 on a trained 128-d embedder
# (XNNPACK vs oneDNN summation order).
FP32_TOLERANCE = 1e-5
NORM_TOLERANCE = 1e-5
# The untrained embedder's embeddings lie close together, so its nearest neighbours are fragile:
# measured 0.66 (int8) on 160 images; a trained one keeps 0.81 (benchmarks/results/tflite.md: 0.84).
NN_AGREEMENT_UNTRAINED = 0.6


@pytest.fixture(scope="module")
def embedder():
    keras.utils.set_random_seed(0)  # the retrieval figures quoted below were measured with these weights
    return build_embedder(width=0.25, embedding_dim=DIM, image_size=SIZE)


@pytest.fixture(scope="module")
def vehicles():
    return SyntheticVehicles(seed=0, image_size=SIZE, num_makes=4, models_per_make=2, images_per_class=8)


@pytest.fixture(scope="module")
def unseen(vehicles):
    return vehicles.imageset("unseen")


@pytest.fixture(scope="module")
def files(embedder, vehicles, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tflite")
    calibration = vehicles.imageset("train").images
    return {
        mode: export_tflite(embedder, str(directory / f"{mode}.tflite"), SIZE, mode=mode,
                            representative_images=calibration if mode == "int8" else None)
        for mode in ("fp32", "dynamic", "int8")
    }


@pytest.fixture(scope="module")
def parity(embedder, files, unseen):
    return tflite_parity(embedder, files, unseen.images, unseen.labels)


def test_fp32_matches_keras_within_1e_5(embedder, files, unseen):
    tflite = TFLiteEmbedder(files["fp32"])
    out = tflite(unseen.images)
    expected = np.asarray(embedder(unseen.images, training=False))
    np.testing.assert_allclose(out, expected, atol=FP32_TOLERANCE, rtol=0)
    # normalised by plain ops, not TFLite's fused builtin (its norm floor is 1e-6, see below)
    assert "L2_NORMALIZATION" not in tflite.op_names and "RSQRT" in tflite.op_names


def test_tiny_features_are_still_normalised_exactly(unseen, tmp_path):
    """TFLite's fused L2_NORMALIZATION clamps norms below 1e-6: such features came out with norm ~1e-3."""
    embedder = build_embedder(width=0.25, embedding_dim=DIM, image_size=SIZE)
    embedder.embedding.kernel.assign(embedder.embedding.kernel * 1e-9)
    features = np.asarray(embedder.features(unseen.images[:4]))
    assert np.linalg.norm(features, axis=1).max() < 1e-6
    out = TFLiteEmbedder(export_tflite(embedder, str(tmp_path / "tiny.tflite"), SIZE))(unseen.images[:4])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=NORM_TOLERANCE)
    np.testing.assert_allclose(out, np.asarray(embedder(unseen.images[:4], training=False)), atol=FP32_TOLERANCE)


def test_fp32_matches_the_saved_model_graph_on_the_same_decoded_images(embedder, files, unseen):
    # the function `export_embedder` saves as `embed_decoded` (its reload is compared in test_saved_model)
    saved = EmbedderModule(embedder, SIZE).embed_decoded(tf.constant(unseen.images[:5]))["embeddings"].numpy()
    np.testing.assert_allclose(TFLiteEmbedder(files["fp32"])(unseen.images[:5]), saved, atol=FP32_TOLERANCE, rtol=0)


def test_parity_runs_a_saved_model_on_the_same_images(embedder, files, unseen, tmp_path):
    class StandIn(tf.Module):  # a SavedModel with an `embed_decoded` signature, cheap to save
        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8)])
        def embed_decoded(self, images):
            colour = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])
            return {"embeddings": tf.math.l2_normalize(tf.tile(colour, [1, 6])[:, :DIM], axis=1)}

    module = StandIn()
    path = str(tmp_path / "stand_in")
    tf.saved_model.save(module, path, signatures={"embed_decoded": module.embed_decoded})
    images, labels = unseen.images[:8], unseen.labels[:8]
    report = tflite_parity(embedder, {"fp32": files["fp32"]}, images, labels, saved_model=path)
    stand_in = module.embed_decoded(tf.constant(images))["embeddings"].numpy()
    tflite = TFLiteEmbedder(files["fp32"])(images)
    keras_out = np.asarray(embedder(images, training=False))
    assert report["saved_model"]["max_abs_diff"] == pytest.approx(np.abs(stand_in - keras_out).max(), abs=1e-6)
    assert report["fp32"]["max_abs_diff_vs_saved_model"] == pytest.approx(np.abs(tflite - stand_in).max(), abs=1e-6)


def test_interface_is_uint8_images_to_float_embeddings_with_any_batch(files, unseen):
    tflite = TFLiteEmbedder(files["int8"], num_threads=1)
    assert (tflite.image_size, tflite.embedding_dim) == (SIZE, DIM)
    inputs = tflite.interpreter.get_input_details()[0]
    assert inputs["dtype"] == np.uint8 and list(inputs["shape_signature"]) == [-1, SIZE, SIZE, 3]
    assert tflite.interpreter.get_output_details()[0]["dtype"] == np.float32
    one, three = tflite(unseen.images[:1]), tflite(unseen.images[:3])
    assert one.shape == (1, DIM) and three.shape == (3, DIM)
    np.testing.assert_allclose(three[:1], one, atol=1e-6)
    with pytest.raises(ValueError, match="must have shape"):
        tflite(unseen.images[:, :16])


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_quantized_models_give_finite_unit_vectors(files, unseen, parity, mode):
    out = TFLiteEmbedder(files[mode]).embed(unseen.images)
    assert out.shape == (len(unseen.images), DIM) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=NORM_TOLERANCE)
    report = parity[mode]
    assert report["max_norm_error"] <= NORM_TOLERANCE
    assert 0 < report["max_abs_diff"] < 0.5  # quantized, so not equal; not garbage either
    assert report["nn_agreement"] >= NN_AGREEMENT_UNTRAINED  # retrieval: test_int8_retrieval_is_close_to_fp32...


def test_int8_is_quantized_and_keeps_the_head_in_float(files):
    tflite = TFLiteEmbedder(files["int8"])
    details = tflite.interpreter.get_tensor_details()
    int8_tensors = [t for t in details if t["dtype"] == np.int8]
    assert len(int8_tensors) > 10  # weights and activations of the backbone
    assert {"QUANTIZE", "DEQUANTIZE", "RSQRT"} <= tflite.op_names
    ops = tflite.interpreter._get_ops_details()
    head = [op for op in ops if len(details[op["outputs"][0]]["shape_signature"]) <= 2]
    assert {op["op_name"] for op in head} >= {"MEAN", "FULLY_CONNECTED", "RSQRT"}
    assert all(details[op["outputs"][0]]["dtype"] == np.float32 for op in head)


def test_parity_report(parity, unseen):
    assert set(parity) == {"reference", "fp32", "dynamic", "int8"}
    assert parity["reference"]["num_images"] == len(unseen.images)
    assert parity["fp32"]["max_abs_diff"] <= FP32_TOLERANCE
    assert parity["fp32"]["nn_agreement"] == 1.0 and parity["fp32"]["recall@1_drop"] == pytest.approx(0, abs=1e-9)
    for mode in ("dynamic", "int8"):
        assert parity[mode]["recall@1_drop"] == pytest.approx(
            parity["reference"]["recall@1"] - parity[mode]["recall@1"])


def _neighbours(embeddings):
    """Leave-one-out nearest neighbour of each embedding (float64 inner products)."""
    embeddings = np.asarray(embeddings, np.float64)
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _int8_retrieval(embedder, files, imageset):
    """Recall@1 of the fp32 and int8 files, and how often int8 finds Keras's nearest neighbour,
    computed here from the embeddings; `tflite_parity` must report the same."""
    images, labels = imageset.images, imageset.labels
    reference = _neighbours(np.asarray(embedder(images, training=False)))
    fp32, int8 = (_neighbours(TFLiteEmbedder(files[mode]).embed(images)) for mode in ("fp32", "int8"))
    figures = {"fp32": float(np.mean(labels[fp32] == labels)), "int8": float(np.mean(labels[int8] == labels)),
               "nn_agreement": float(np.mean(int8 == reference))}
    report = tflite_parity(embedder, {"int8": files["int8"]}, images, labels)["int8"]
    assert report["recall@1"] == pytest.approx(figures["int8"])
    assert report["nn_agreement"] == pytest.approx(figures["nn_agreement"])
    return figures


def test_int8_retrieval_is_close_to_fp32_on_the_same_images(embedder, files):
    """160 images of the unseen classes: measured Recall@1 33.1 % fp32, 34.4 % int8, the same
    nearest neighbour as Keras for 66 % (an untrained embedder: see NN_AGREEMENT_UNTRAINED)."""
    unseen = SyntheticVehicles(seed=0, image_size=SIZE, num_makes=4, models_per_make=2,
                               images_per_class=40).imageset("unseen")
    figures = _int8_retrieval(embedder, files, unseen)
    assert abs(figures["int8"] - figures["fp32"]) <= 0.03
    assert figures["nn_agreement"] >= NN_AGREEMENT_UNTRAINED


@pytest.mark.slow
def test_int8_retrieval_of_a_trained_embedder_is_within_two_points_of_fp32(tmp_path):
    """A trained embedder (softmax, 6 × 50 steps at 32 px; about 1 min): measured Recall@1 28.8 %
    fp32, 27.8 % int8 on the 320 images of the 8 unseen classes, the same neighbour for 81 %."""
    from fgkeras import configs, experiments

    config = configs.override(configs.smoke(configs.get_config("baseline")), [
        f"data.image_size={SIZE}", "data.images_per_class=40", "train.method=softmax_nobias", "train.epochs=6",
        "train.steps_per_epoch=50", "train.classes_per_batch=6"])
    train_set, test_set = experiments.load_data(config.data)
    embedder = experiments.train(config, train_set=train_set, verbose=0)[0].embedder
    files = {mode: export_tflite(embedder, str(tmp_path / f"{mode}.tflite"), SIZE, mode=mode,
                                 representative_images=train_set.images if mode == "int8" else None)
             for mode in ("fp32", "int8")}
    figures = _int8_retrieval(embedder, files, test_set)
    assert figures["fp32"] >= 0.2  # it learned: a random neighbour is of the same class 12 % of the time
    assert abs(figures["int8"] - figures["fp32"]) <= 0.02
    assert figures["nn_agreement"] >= 0.75


def test_fully_quantized_l2_normalisation_is_caught(embedder, vehicles, unseen):
    """Quantizing the normalisation gives int8 outputs (scale 1/128): norms drift off 1.

    This is what the float head avoids; the norm check above would catch it.
    """
    content = convert_tflite(embedder, SIZE, "int8", vehicles.imageset("train").images, float_head=False)
    out = TFLiteEmbedder(model_content=content).embed(unseen.images)
    assert np.abs(np.linalg.norm(out, axis=1) - 1.0).max() > 10 * NORM_TOLERANCE


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_l2_normalize_layer_alone_converts_with_parity_above_the_builtin_floor():
    """The layer as such becomes TFLite's L2_NORMALIZATION: exact for norms >= 1e-3."""
    layer = L2Normalize()

    @tf.function(input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    def normalise(x):
        return layer(x)

    content = tf.lite.TFLiteConverter.from_concrete_functions([normalise.get_concrete_function()]).convert()
    interpreter = tf.lite.Interpreter(model_content=content)
    assert {op["op_name"] for op in interpreter._get_ops_details()} == {"L2_NORMALIZATION"}
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, DIM)) * np.logspace(-3, 4, 60)[:, None]).astype(np.float32)
    x[0] = 0.0
    interpreter.resize_tensor_input(0, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, np.asarray(layer(x)), atol=1e-6)
    np.testing.assert_array_equal(out[0], 0.0)  # a zero vector stays zero, not NaN
    np.testing.assert_allclose(np.linalg.norm(out[1:], axis=1), 1.0, atol=1e-6)


def test_int8_needs_representative_images(embedder):
    with pytest.raises(ValueError, match="representative_images"):
        convert_tflite(embedder, SIZE, "int8")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        convert_tflite(embedder, SIZE, "int4")


def test_representative_images_of_another_size_are_resized(embedder, unseen):
    big = np.repeat(np.repeat(unseen.images[:4], 2, axis=1), 2, axis=2)  # 64 x 64
    content = convert_tflite(embedder, SIZE, "int8", big)
    assert TFLiteEmbedder(model_content=content)(unseen.images[:2]).shape == (2, DIM)


def test_export_writes_the_file_atomically_durably_and_readably(embedder, tmp_path, monkeypatch):
    path = tmp_path / "model.tflite"
    (tmp_path / "model.tflite.tmp").mkdir()  # a fixed temporary name, or another writer's, is not used
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    previous = os.umask(0o022)
    try:
        export_tflite(embedder, str(path), SIZE)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert str(tmp_path) in synced and any(name.startswith(str(tmp_path / ".model.tflite.tmp-")) for name in synced)
    assert sorted(os.listdir(tmp_path)) == ["model.tflite", "model.tflite.tmp"]
    interpreter = TFLiteEmbedder(str(path))
    assert interpreter(np.zeros((1, SIZE, SIZE, 3), np.uint8)).shape == (1, DIM)
