import keras
import keras_hub
import numpy as np
import pytest
from PIL import Image

from fgkeras.models.htg import KeypointEmbedder
from fgkeras.viz import keypoint_overlays
from fgkeras.viz import overlay_heatmap


class _FixedKeypoints:
    """Stands in for a KeypointEmbedder: channel c of image i peaks at a known cell."""

    levels = ["P3"]

    def __init__(self, maps):
        self.maps = maps

    def keypoint_maps(self, images):
        return {"P3": self.maps[: len(images)]}


def _maps(batch=2, size=4, channels=3):
    maps = np.full((batch, size, size, channels), 0.01, "float32")
    for i in range(batch):
        for c in range(channels):
            maps[i, c, (i + c) % size, c] = 1.0 - 0.2 * c  # channel 0 peaks highest
    return maps / maps.sum(axis=(1, 2), keepdims=True)


def test_overlay_colours_the_peak_and_keeps_the_rest():
    image = np.full((32, 32, 3), 128, "uint8")
    heatmap = np.zeros((4, 4), "float32")
    heatmap[0, 0] = 1.0
    out = overlay_heatmap(image, heatmap, alpha=0.8)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out[0, 0].astype(int) - 128).sum() > 100  # coloured at the peak
    np.testing.assert_array_equal(out[-1, -1], [128, 128, 128])  # untouched far from it
    np.testing.assert_array_equal(overlay_heatmap(image, np.zeros((4, 4))), image)


def test_writes_a_grid_of_image_v_and_strongest_maps(tmp_path, rng):
    images = rng.integers(0, 256, (2, 16, 16, 3)).astype("uint8")
    path = keypoint_overlays(_FixedKeypoints(_maps()), images, tmp_path / "figs" / "kpm.png", num_maps=2,
                             cell_size=24)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 24, (1 + 1 + 2) * 24, 3)
    first_cell = np.asarray(Image.fromarray(images[0]).resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(grid[:24, :24], first_cell)
    # Column 2 is the strongest channel (0) of image 0, which peaks at row 0, column 0 of the map.
    strongest = grid[:24, 2 * 24:3 * 24].astype(int) - first_cell
    assert np.abs(strongest[:6, :6]).mean() > np.abs(strongest[-6:, -6:]).mean() + 20


def test_works_with_a_keypoint_embedder(tmp_path, rng):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8, 16, 16],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3),
    )
    embedder = KeypointEmbedder(backbone, global_dim=8, levels=("P3", "P4"))
    embedder.build((None, 32, 32, 3))
    images = rng.integers(0, 256, (2, 32, 32, 3)).astype("float32")
    path = keypoint_overlays(embedder, images, str(tmp_path / "kpm.png"), num_maps=20, cell_size=16)
    assert np.asarray(Image.open(path)).shape == (32, (1 + 1 + 8) * 16, 3)  # P3 has 8 channels


def test_bad_arguments(tmp_path):
    images = np.zeros((1, 8, 8, 3), "uint8")
    with pytest.raises(ValueError, match="need an embedder with a KPM branch"):
        keypoint_overlays(keras.layers.Dense(2), images, tmp_path / "x.png")
    with pytest.raises(ValueError, match="`level` must be one of \\['P3'\\]"):
        keypoint_overlays(_FixedKeypoints(_maps(1)), images, tmp_path / "x.png", level="P5")
    with pytest.raises(ValueError, match="`num_maps` must be >= 0"):
        keypoint_overlays(_FixedKeypoints(_maps(1)), images, tmp_path / "x.png", num_maps=-1)
    with pytest.raises(ValueError, match="`alpha` must be in"):
        overlay_heatmap(images[0], np.ones((2, 2)), alpha=2)
