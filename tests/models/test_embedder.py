import keras
import numpy as np
import pytest

from fgkeras.models import Embedder, build_embedder


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")


@pytest.mark.parametrize("pooling", ["gap", "mac", "spoc", "gem"])
def test_embeddings_are_unit_vectors(pooling, images):
    embedder = build_embedder(width=0.25, embedding_dim=16, pooling=pooling, image_size=32)
    out = np.asarray(embedder(images))
    assert out.shape == (2, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    features = np.asarray(embedder.features(images))
    np.testing.assert_allclose(out, features / np.linalg.norm(features, axis=1, keepdims=True), rtol=1e-5)


def test_uint8_and_float_inputs_agree(images):
    embedder = build_embedder(width=0.25, embedding_dim=8, image_size=32)
    np.testing.assert_allclose(embedder(images), embedder(images.astype("float32")), rtol=1e-6)


def test_config_round_trip(images):
    embedder = build_embedder(width=0.25, embedding_dim=8, pooling="gem", image_size=32)
    clone = Embedder.from_config(embedder.get_config())
    clone.build((None, 32, 32, 3))
    assert clone.embedding_dim == 8 and clone.pooling == "gem"
    assert clone(images).shape == (2, 8)


def test_keras_file_round_trip(tmp_path, images):
    embedder = build_embedder(width=0.25, embedding_dim=8, image_size=32)
    expected = np.asarray(embedder(images))
    path = str(tmp_path / "embedder.keras")
    embedder.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(images), expected, rtol=1e-5, atol=1e-6)
    assert restored(images[:1]).shape == (1, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"embedding_dim": 0}, "`embedding_dim` must be >= 1"),
    ({"pooling": "median"}, "`pooling` must be one of"),
    ({"dropout": 1.0}, "`dropout` must be in"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Embedder(keras.Sequential([keras.layers.Conv2D(4, 3)]), **kwargs)
