import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras.evaluation.embed import embed_dataset

NUM_IMAGES = 10


@pytest.fixture
def images():
    return np.random.default_rng(0).random((NUM_IMAGES, 8, 8, 3)).astype(np.float32)


@pytest.fixture
def dataset(images):
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": images,
            "label": np.arange(NUM_IMAGES) % 3,
            "view": np.arange(NUM_IMAGES) % 8,
            "year": np.full(NUM_IMAGES, 2001),
            "is_stock": np.arange(NUM_IMAGES) < 2,
        }
    )


@pytest.fixture
def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dropout(0.9)(x)  # active only in training: embeddings must not be dropped out
    return keras.Model(inputs, keras.layers.Dense(4)(x))


@pytest.mark.parametrize("batch_first, batch_size", [(None, None), (None, 4), (3, None), (3, 4)])
def test_embeds_batched_and_unbatched_datasets(model, dataset, images, batch_first, batch_size):
    if batch_first:
        dataset = dataset.batch(batch_first)
    outputs = embed_dataset(model, dataset, batch_size=batch_size, verbose=False)
    assert list(outputs) == ["embeddings", "label", "view", "year", "is_stock"]
    assert outputs["embeddings"].dtype == np.float32
    np.testing.assert_allclose(outputs["embeddings"], model(images, training=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["label"], np.arange(NUM_IMAGES) % 3)
    np.testing.assert_array_equal(outputs["is_stock"], np.arange(NUM_IMAGES) < 2)


def test_a_model_built_under_mirrored_strategy_embeds_each_image_once(mirrored_strategy, dataset, images):
    # Keras's predict_on_batch gives each replica the whole batch there (2 × the rows).
    with mirrored_strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        mirrored = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(inputs)))
    outputs = embed_dataset(mirrored, dataset, batch_size=4, verbose=False)
    np.testing.assert_allclose(outputs["embeddings"], mirrored(images, training=False), rtol=1e-5, atol=1e-6)


def test_embeds_with_a_plain_callable(dataset, images):
    outputs = embed_dataset(lambda batch: tf.reshape(batch, (tf.shape(batch)[0], -1)), dataset, verbose=False)
    np.testing.assert_array_equal(outputs["embeddings"], images.reshape(NUM_IMAGES, -1))


class FlattenDropout(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dropout = keras.layers.Dropout(0.99)

    def call(self, inputs, training=None):
        flat = keras.ops.reshape(inputs, (keras.ops.shape(inputs)[0], -1))
        return self.dropout(flat, training=training)


def test_embeds_with_a_layer_in_inference_mode(dataset, images):
    outputs = embed_dataset(FlattenDropout(), dataset, batch_size=4, verbose=False)
    np.testing.assert_array_equal(outputs["embeddings"], images.reshape(NUM_IMAGES, -1))


def test_rejects_a_dataset_without_dicts(images):
    with pytest.raises(ValueError, match="dataset"):
        embed_dataset(lambda batch: batch, tf.data.Dataset.from_tensor_slices((images, np.zeros(NUM_IMAGES))))


def test_rejects_a_model_output_that_is_not_one_embedding_per_image(dataset):
    with pytest.raises(ValueError, match="model"):
        embed_dataset(lambda batch: batch, dataset, verbose=False)


def test_embedding_keeps_no_model_alive(dataset):
    import gc
    import weakref

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(inputs)))
    embed_dataset(model, dataset, verbose=False)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the traced inference function is cached without owning its model
