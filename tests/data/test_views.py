import numpy as np
import pytest

from fgkeras.data import SyntheticVehicles
from fgkeras.data.views import front_views, pair_indices, render_views, view_pairs


@pytest.fixture(scope="module")
def vehicles():
    return SyntheticVehicles(image_size=32, num_makes=2, models_per_make=2, supersample=1)


def test_front_views_are_the_five_within_90_degrees_of_the_front():
    assert front_views(8) == [6, 7, 0, 1, 2]
    assert len(front_views(16)) == 9 and 8 not in front_views(16)


def test_render_views_draws_every_instance_in_every_view(vehicles):
    arrays = render_views(vehicles, "train", instances_per_class=2)
    n = vehicles.num_classes_in("train") * 2 * 5
    assert arrays["image"].shape == (n, 32, 32, 3) and arrays["views"] == [6, 7, 0, 1, 2]
    c, i = int(arrays["label"][7]), int(arrays["instance"][7])
    np.testing.assert_array_equal(arrays["image"][7], vehicles.render(c, arrays["views"][arrays["view"][7]], i))


def test_pairs_are_the_same_instance_in_another_view(vehicles):
    arrays = render_views(vehicles, "unseen", instances_per_class=2, views=[0, 2, 6])
    partner = pair_indices(arrays, np.random.default_rng(0))
    assert np.all(arrays["label"][partner] == arrays["label"]) and np.all(arrays["instance"][partner] == arrays["instance"])
    assert np.all(arrays["view"][partner] != arrays["view"])
    batch = next(iter(view_pairs(arrays, batch_size=4)))
    assert set(batch) == {"image", "label", "view", "target_view", "target_image"}
    assert batch["image"].shape == (4, 32, 32, 3) and np.all(batch["view"].numpy() != batch["target_view"].numpy())


@pytest.mark.parametrize("kwargs, message", [
    ({"views": [0]}, "`views` must be >= 2 distinct azimuths in \\[0, 8\\)"),
    ({"views": [0, 9]}, "`views` must be >= 2 distinct"),
    ({"instances_per_class": 0}, "`instances_per_class` must be an int >= 1"),
    ({"classes": [99]}, "`classes` must be classes of the 'train' split"),
])
def test_bad_arguments(vehicles, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_views(vehicles, "train", **kwargs)
