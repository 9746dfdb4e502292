"""FGGAN's view-normalisation grid (`fgkeras.viz.canonical_grid`)."""

import numpy as np
import pytest
from PIL import Image

from fgkeras.data import ImageSet
from fgkeras.viz import canonical_grid, class_views
from fgkeras.viz.canonical import _GAP


def _inverted(images, training=False):
    """A stand-in for G: the photographic negative, so that its cells differ from the inputs."""
    return 255.0 - np.asarray(images, "float32")


def test_grid_rows_are_input_views_then_gs_images_then_the_canonical_photo(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (2, 3, 8, 8, 3)).astype("uint8")
    canonical = rng.integers(0, 256, (2, 8, 8, 3)).astype("uint8")
    grid = canonical_grid(_inverted, inputs, canonical, path=tmp_path / "grid.png")
    assert grid.shape == (_GAP + 2 * (8 + _GAP), 3 * _GAP + 7 * (8 + _GAP), 3)

    def cell(row, column):
        group = (column >= 3) + (column >= 6)
        top, left = _GAP + row * (8 + _GAP), _GAP * (1 + group) + column * (8 + _GAP)
        return grid[top:top + 8, left:left + 8]

    for row in range(2):
        for view in range(3):
            np.testing.assert_array_equal(cell(row, view), inputs[row, view])
            np.testing.assert_array_equal(cell(row, 3 + view), 255 - inputs[row, view])
        np.testing.assert_array_equal(cell(row, 6), canonical[row])
    with Image.open(tmp_path / "grid.png") as image:
        np.testing.assert_array_equal(np.asarray(image), grid)


def test_class_views_picks_user_photos_by_view_and_the_canonical_stock_photo():
    images = np.repeat(np.arange(6, dtype=np.uint8), 4 * 4 * 3).reshape(6, 4, 4, 3)
    imageset = ImageSet(labels=[0, 0, 0, 1, 1, 1], images=images, views=[0, 1, 2, 0, 2, 1],
                        is_stock=[True, False, False, True, False, False])
    inputs, canonical = class_views(imageset, classes=[1, 0], views=[2, 1])
    assert inputs[:, :, 0, 0, 0].tolist() == [[4, 5], [2, 1]] and canonical[:, 0, 0, 0].tolist() == [3, 0]
    with pytest.raises(ValueError, match="Class 0 has no user photo in view 0"):
        class_views(imageset, classes=[0], views=[0])
    with pytest.raises(ValueError, match="`canonical` must be one \\(8, 8, 3\\) photo per class"):
        canonical_grid(_inverted, np.zeros((2, 1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
