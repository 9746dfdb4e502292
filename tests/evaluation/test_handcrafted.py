import numpy as np
import pytest

from fgkeras.data import ImageSet
from fgkeras.evaluation import colour_histograms, handcrafted_metrics, pixel_features


def _filled(colour, size=8):
    return np.broadcast_to(np.array(colour, np.uint8), (size, size, 3)).copy()


def test_colour_histograms_count_colours_not_their_places_and_leave_out_black_padding():
    red, blue = _filled((250, 10, 10)), _filled((10, 10, 250))
    half = red.copy()
    half[:, 4:] = blue[:, 4:]
    shuffled = half.reshape(-1, 3)[np.random.default_rng(0).permutation(64)].reshape(8, 8, 3)
    padded = red.copy()
    padded[:3] = 0  # the black bands of resize_and_pad
    features = colour_histograms(np.stack([red, blue, half, shuffled, padded]), bins=4)
    assert features.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-6)
    similarity = features @ features.T
    assert similarity[0, 1] == 0.0  # no colour in common
    np.testing.assert_allclose(similarity[2, 3], 1.0, rtol=1e-6)  # same colours, other places
    np.testing.assert_allclose(similarity[0, 4], 1.0, rtol=1e-6)  # padding does not count
    np.testing.assert_allclose(similarity[0, 2], np.sqrt(0.5), rtol=1e-6)  # Bhattacharyya of 1 and ½·½


def test_colour_histograms_reject_a_grey_batch():
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        colour_histograms(np.zeros((2, 8, 8), np.uint8))


def test_pixel_features_ignore_brightness_and_follow_the_layout():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (32, 32, 3)).astype(np.uint8)
    brighter = image + 40
    mirrored = image[:, ::-1]
    features = pixel_features(np.stack([image, brighter, mirrored]), side=8)
    assert features.shape == (3, 8 * 8 * 3)
    np.testing.assert_allclose(features[0] @ features[1], 1.0, rtol=1e-5)
    assert features[0] @ features[2] < 0.5  # the same colours elsewhere are another picture


def test_handcrafted_metrics_rank_by_colour_on_an_image_set():
    # Two classes of distinct colours, four noisy photos each: the histogram finds the class
    # every time, the pixels too (the noise is small next to the colour difference).
    rng = np.random.default_rng(1)
    colours = [(200, 40, 40), (40, 40, 200)]
    images = np.stack([np.clip(_filled(colours[label], 16).astype(int) + rng.integers(-20, 20, (16, 16, 3)), 1, 255)
                       for label in (0, 0, 0, 0, 1, 1, 1, 1)]).astype(np.uint8)
    results = handcrafted_metrics(ImageSet(labels=np.repeat([0, 1], 4), images=images), image_size=16)
    assert list(results) == ["pixels", "colour histogram"]
    assert results["colour histogram"]["recall@1"] == 1.0
    assert results["colour histogram"]["num_queries"] == 8
