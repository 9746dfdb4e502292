import numpy as np
import pytest
import tensorflow as tf

from fgkeras.data import Augment

SEEDS = [tf.constant([s, 1], tf.int64) for s in range(40)]


@pytest.fixture
def image(rng):
    return tf.constant(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


@pytest.fixture
def left_bright():
    """Gray image, bright left half, dark right half: a flip swaps them."""
    array = np.full((32, 32, 3), 50, np.uint8)
    array[:, :16] = 200
    return tf.constant(array)


@pytest.mark.parametrize(
    "augment", [Augment(), Augment.standard(), Augment(crop_scale=(0.2, 0.4), hue=0.5)]
)
def test_keeps_shape_and_dtype(image, augment):
    out = augment(image, seed=SEEDS[0])
    assert out.shape == image.shape and out.dtype == tf.uint8


def test_same_seed_same_image_and_seeds_differ(image):
    augment = Augment.standard()
    np.testing.assert_array_equal(augment(image, SEEDS[3]), augment(image, SEEDS[3]))
    assert not np.array_equal(augment(image, SEEDS[3]), augment(image, SEEDS[4]))


def test_none_is_identity(image):
    assert Augment.none().is_identity
    for seed in SEEDS[:5]:
        np.testing.assert_array_equal(Augment.none()(image, seed), image)


def is_flipped(out):
    columns = tf.reduce_mean(tf.cast(out, tf.float32), axis=(0, 2)).numpy()
    return columns[0] < columns[-1]


def test_flip_false_never_flips(left_bright):
    augment = Augment.standard(flip=False)
    assert not any(is_flipped(augment(left_bright, seed)) for seed in SEEDS)


def test_flip_true_flips_about_half(left_bright):
    flips = [is_flipped(Augment.standard()(left_bright, seed)) for seed in SEEDS]
    assert 5 < sum(flips) < 35
    for seed in SEEDS[:8]:
        out = Augment()(left_bright, seed).numpy()  # flip only: exact mirror or unchanged
        assert np.array_equal(out, left_bright) or np.array_equal(out, left_bright[:, ::-1])


def test_crop_zooms_in(left_bright):
    out = Augment(flip=False, crop_scale=(0.25, 0.3))(left_bright, SEEDS[0]).numpy()
    assert not np.array_equal(out, left_bright)


def test_works_in_tf_data_graph(image):
    dataset = tf.data.Dataset.from_tensors(image).repeat(3).map(lambda x: Augment.standard()(x))
    outputs = list(dataset)
    assert all(out.shape == (24, 32, 3) for out in outputs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop_scale=(0.5, 1.5)), "crop_scale"),
        (dict(crop_scale=0.5), r"\(min, max\) pair"),
        (dict(crop_ratio=(2.0, 1.0)), "crop_ratio"),
        (dict(brightness=-0.1), "brightness"),
        (dict(hue=0.6), "hue"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Augment(**kwargs)


def test_rejects_float_images_and_round_trips_config():
    with pytest.raises(ValueError, match="uint8"):
        Augment()(tf.zeros([4, 4, 3]), SEEDS[0])
    augment = Augment.standard(flip=False)
    assert Augment.from_config(augment.get_config()) == augment
