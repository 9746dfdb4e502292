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


@pytest.fixture
def mid_tones(rng):
    """Colours in [70, 180]: no jitter below pushes a channel past 0 or 255, so none clips."""
    return rng.integers(70, 181, (24, 32, 3), dtype=np.uint8)


def _jittered(augment, image):
    """(input, outputs over SEEDS) as float arrays (N, H, W, 3)."""
    outputs = np.stack([augment(tf.constant(image), seed).numpy() for seed in SEEDS])
    return image.astype(np.float64), outputs.astype(np.float64)


def _chroma(pixels):
    return pixels.max(axis=-1) - pixels.min(axis=-1)


def test_brightness_adds_one_bounded_nonzero_delta_to_every_channel(mid_tones):
    before, after = _jittered(Augment(flip=False, brightness=0.2), mid_tones)
    shift = (after - before).mean(axis=(1, 2))  # per seed and channel
    assert np.abs(shift).max() <= 0.2 * 255 + 1
    assert np.abs(after - before - shift[:, None, None, :]).max() <= 1  # the same delta at every pixel
    assert np.ptp(shift, axis=1).max() <= 0.5  # and in every channel
    assert np.abs(shift).max() > 0.1 * 255 and shift.min() < 0 < shift.max()


def test_contrast_scales_each_channel_about_its_mean_within_bounds(mid_tones):
    before, after = _jittered(Augment(flip=False, contrast=0.3), mid_tones)
    assert np.abs(after.mean(axis=(1, 2)) - before.mean(axis=(0, 1))).max() <= 1
    ratio = after.std(axis=(1, 2)) / before.std(axis=(0, 1))
    assert 0.7 - 0.02 <= ratio.min() and ratio.max() <= 1.3 + 0.02
    assert np.abs(ratio - 1).max() > 0.1


def test_saturation_scales_the_chroma_and_leaves_greys_alone(mid_tones):
    augment = Augment(flip=False, saturation=0.3)
    before, after = _jittered(augment, mid_tones)
    assert np.abs(after.max(axis=-1) - before.max(axis=-1)).max() <= 1  # the value (brightest channel) stays
    coloured = _chroma(before) >= 20
    ratio = _chroma(after)[:, coloured].mean(axis=1) / _chroma(before)[coloured].mean()
    assert 0.7 - 0.02 <= ratio.min() and ratio.max() <= 1.3 + 0.02
    assert np.abs(ratio - 1).max() > 0.1
    grey = np.repeat(mid_tones[..., :1], 3, axis=-1)
    grey_before, grey_after = _jittered(augment, grey)
    assert np.abs(grey_after - grey_before).max() <= 1


def test_hue_turns_colours_by_a_bounded_nonzero_amount(mid_tones):
    hue = 0.05
    before, after = _jittered(Augment(flip=False, hue=hue), mid_tones)
    # A hue turn keeps each pixel's brightest and darkest channel values and moves a channel
    # by at most 6 * turn * chroma (HSV is piecewise linear in hue with that slope).
    assert np.abs(after.max(axis=-1) - before.max(axis=-1)).max() <= 1
    assert np.abs(after.min(axis=-1) - before.min(axis=-1)).max() <= 1
    assert np.all(np.abs(after - before) <= 6 * hue * _chroma(before)[..., None] + 1)
    assert np.abs(after - before).mean(axis=(1, 2, 3)).max() > 2  # random hues: the means barely move


def test_standard_jitter_moves_the_channel_means_by_a_bounded_nonzero_amount(mid_tones):
    config = {**Augment.standard().get_config(), "flip": False, "crop_scale": None}
    augment = Augment.from_config(config)
    before, after = _jittered(augment, mid_tones)
    shift = np.abs(after.mean(axis=(1, 2)) - before.mean(axis=(0, 1)))  # per seed and channel
    # brightness moves a mean by <= 0.2 * 255, saturation and hue by a fraction of the chroma
    assert shift.max() <= 0.2 * 255 + (0.2 + 6 * 0.02) * _chroma(before).max() + 1
    assert np.median(shift.max(axis=1)) > 5


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
