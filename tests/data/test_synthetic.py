import csv
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fgkeras.data.synthetic import SyntheticVehicles

TINY = dict(image_size=32, num_makes=3, models_per_make=4, images_per_class=10,
            stock_fraction=0.2)


@pytest.fixture(scope="module")
def tiny():
    return SyntheticVehicles(seed=0, **TINY)


def _border(image):
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)


def _foreground(image, background=234):
    """Pixels of a stock photo that are not the plain background."""
    return np.any(image != background, axis=-1)


def test_same_seed_gives_identical_arrays_other_seed_differs(tiny):
    again = SyntheticVehicles(seed=0, **TINY).arrays("train")
    other = SyntheticVehicles(seed=1, **TINY).arrays("train")
    for key, value in tiny.arrays("train").items():
        np.testing.assert_array_equal(value, again[key])
    assert not np.array_equal(tiny.arrays("train")["image"], other["image"])
    other_parts = [SyntheticVehicles(seed=1, **TINY).parts(c) for c in range(tiny.num_classes)]
    assert other_parts != [tiny.parts(c) for c in range(tiny.num_classes)]


def test_any_image_renders_alone_from_split_and_index(tiny):
    arrays = tiny.arrays("unseen")
    fresh = SyntheticVehicles(seed=0, **TINY)
    for index in (0, 7, len(arrays["label"]) - 1):
        item = fresh.item("unseen", index)
        np.testing.assert_array_equal(item["image"], arrays["image"][index])
        assert item["label"] == arrays["label"][index]
        assert item["view"] == arrays["view"][index]
        assert item["is_stock"] == arrays["is_stock"][index]


@pytest.mark.parametrize("image_size", [32, 96])
def test_shapes_and_dtypes(image_size):
    data = SyntheticVehicles(seed=2, image_size=image_size, num_makes=1, models_per_make=2,
                             images_per_class=3)
    arrays = data.arrays("train")
    n = data.num_images("train")
    assert arrays["image"].shape == (n, image_size, image_size, 3)
    assert arrays["image"].dtype == np.uint8
    for key in ("label", "view", "year"):
        assert arrays[key].shape == (n,) and arrays[key].dtype == np.int32
    assert arrays["is_stock"].shape == (n,) and arrays["is_stock"].dtype == bool
    single = data.render(0, 5, 11)
    assert single.shape == (image_size, image_size, 3) and single.dtype == np.uint8
    assert single.std() > 10  # not a blank image


def test_views_cover_all_labels_and_stock_photos_are_front_views(tiny):
    arrays = tiny.arrays("train")
    assert set(arrays["view"].tolist()) == set(range(tiny.num_views))
    stock = arrays["is_stock"]
    assert np.all(arrays["view"][stock] == 0)
    per_class = np.bincount(arrays["label"][stock], minlength=tiny.num_classes)
    assert np.all(per_class[tiny.classes("train")] == 2)  # round(0.2 * 10)


def test_stock_background_is_cleaner_than_user_background(tiny):
    arrays = tiny.arrays("train")
    border_var = np.array([_border(image).var(axis=0).mean() for image in arrays["image"]])
    stock, user = border_var[arrays["is_stock"]], border_var[~arrays["is_stock"]]
    assert stock.max() < user.min()
    assert user.mean() > 50


def test_train_and_unseen_ids_are_disjoint_and_contiguous(tiny):
    train, unseen = tiny.classes("train"), tiny.classes("unseen")
    np.testing.assert_array_equal(train, np.arange(len(train)))
    np.testing.assert_array_equal(unseen, np.arange(len(train), tiny.num_classes))
    assert tiny.num_classes_in("train") + tiny.num_classes_in("unseen") == tiny.num_classes
    assert tiny.num_classes == len(tiny.class_names) == len(set(tiny.class_names))
    assert set(tiny.arrays("unseen")["label"].tolist()) == set(unseen.tolist())


def test_every_make_is_in_both_splits(tiny):
    makes = {split: set(tiny.class_make[tiny.classes(split)].tolist())
             for split in ("train", "unseen")}
    assert makes["train"] == makes["unseen"] == set(range(3))


def test_models_of_a_make_differ_in_enough_parts():
    data = SyntheticVehicles(seed=4, num_makes=3, models_per_make=6, part_changes=2,
                             min_part_differences=3)
    for make in range(3):
        ids = np.flatnonzero(data.class_make == make)
        assert len({data.parts(c)["style"] for c in ids}) == 1
        for a, b in itertools.combinations(ids, 2):
            pa, pb = data.parts(a), data.parts(b)
            assert sum(pa[k] != pb[k] for k in pa) >= 3


def _relative_paints(data, class_id, instances):
    """Per instance, the channel sums of its paint pixels in the front stock photo of
    `class_id`, relative to the mean of `instances` at the same pixels: shape (len(instances), 3).

    Without shape jitter every instance of a class covers the same pixels; the pixels that vary
    between instances are paint, each the paint times its face's shading, so the ratio cancels
    the shading: it depends on the paints alone, not on the class's geometry."""
    images = np.stack([data.render(class_id, 0, i, stock=True) for i in instances]).astype(np.float64)
    paint = np.ptp(images, axis=0).max(axis=-1) > 0
    return images[:, paint].sum(axis=1) / images.mean(axis=0)[paint].sum(axis=0)


def test_an_instance_has_the_same_paint_in_every_class():
    data = SyntheticVehicles(seed=0, image_size=48, num_makes=3, models_per_make=2, shape_jitter=0.0,
                             supersample=1)
    paints = np.array([_relative_paints(data, c, range(8)) for c in range(data.num_classes)])
    assert np.ptp(paints[0], axis=0).min() > 1.0  # the eight instances' paints differ
    for class_id in range(1, data.num_classes):  # other models and other makes: other geometry
        np.testing.assert_allclose(paints[class_id], paints[0], rtol=0.03)


def _lamps(image):
    """Headlight pixels: near-white with a warm cast (no paint is both this bright and this warm)."""
    pixels = image.astype(int)
    return (pixels.min(axis=-1) > 190) & (pixels[..., 0] - pixels[..., 2] > 12) \
        & (pixels[..., 1] - pixels[..., 2] > 12)


def _tail_lights(image):
    pixels = image.astype(int)
    return (pixels[..., 0] > 140) & (pixels[..., 1] < 70) & (pixels[..., 2] < 70)


def _aspect(mask):
    rows, columns = np.nonzero(mask)
    return (np.ptp(columns) + 1) / (np.ptp(rows) + 1)


def test_view_labels_are_the_azimuths_rendered():
    """Checked against the geometry alone: the vehicles are left-right symmetric, so views v and
    N - v are mirror images; the silhouette is widest from the sides (N/4, 3N/4), narrowest
    from the front and the rear (0, N/2); the headlights show only within 90 degrees of the
    front and the tail lights only within 90 degrees of the rear, on the side of the image
    the azimuth turns them to."""
    data = SyntheticVehicles(seed=0, image_size=64, num_makes=2, models_per_make=1)
    n = data.num_views
    azimuths = 2 * np.pi * np.arange(n) / n
    mirror = (-np.arange(n)) % n
    for class_id in range(data.num_classes):
        images = [data.render(class_id, view, 1, stock=True) for view in range(n)]
        masks = [_foreground(image) for image in images]
        iou = np.array([[np.sum(a & b[:, ::-1]) / np.sum(a | b[:, ::-1]) for b in masks] for a in masks])
        np.testing.assert_array_equal(iou.argmax(axis=1), mirror)
        assert iou[np.arange(n), mirror].min() > 0.97
        order = np.argsort([_aspect(mask) for mask in masks])
        assert set(order[:2]) == {0, n // 2} and set(order[-2:]) == {n // 4, 3 * n // 4}
        for view, image in enumerate(images):
            facing = np.cos(azimuths[view])
            lamps, tail = _lamps(image), _tail_lights(image)
            assert lamps.any() == (facing > 1e-6) and tail.any() == (facing < -1e-6), view
            centre = (image.shape[1] - 1) / 2
            for lights, side in ((lamps, -1), (tail, 1)):
                if lights.any() and abs(np.sin(azimuths[view])) > 1e-6:
                    offset = np.nonzero(lights)[1].mean() - centre
                    assert np.sign(offset) == side * np.sign(np.sin(azimuths[view])), view


@pytest.mark.parametrize("seed", [0, 1])
def test_models_of_a_make_look_different_from_the_front(seed):
    """Stock photos are front views: two models of a make must not give the same stock photo."""
    data = SyntheticVehicles(seed=seed)
    for make in range(data.num_makes):
        ids = np.flatnonzero(data.class_make == make).tolist()
        fronts = {c: data.render(c, 0, 0, stock=True).astype(int) for c in ids}
        for a, b in itertools.combinations(ids, 2):
            changed = np.abs(fronts[a] - fronts[b]).max(axis=-1) >= 10
            assert changed.sum() >= 10, (data.class_names[a], data.class_names[b])


def test_colour_varies_within_a_class(tiny):
    means = []
    for instance in range(12):
        image = tiny.render(1, 0, instance, stock=True)
        means.append(image[_foreground(image)].mean(axis=0))
    spread = np.ptp(np.array(means), axis=0)
    assert spread.max() > 80


def test_views_differ_and_renders_repeat(tiny):
    front, side = tiny.render(2, 0, 3, stock=True), tiny.render(2, 2, 3, stock=True)
    assert np.abs(front.astype(int) - side).mean() > 10
    np.testing.assert_array_equal(tiny.render(2, 5, 3), tiny.render(2, 5, 3))
    np.testing.assert_array_equal(tiny.render(2, 0, 3, stock=True), front)


def test_models_of_a_make_are_closer_than_models_of_other_makes():
    data = SyntheticVehicles(seed=0, image_size=48, num_makes=3, models_per_make=3)
    images = {(c, v): data.render(c, v, 0, stock=True).astype(np.float64)
              for c in range(data.num_classes) for v in (0, 1, 2)}
    same, other = [], []
    for a, b in itertools.combinations(range(data.num_classes), 2):
        distance = np.mean([np.abs(images[a, v] - images[b, v]).mean() for v in (0, 1, 2)])
        (same if data.class_make[a] == data.class_make[b] else other).append(distance)
    assert min(same) > 0
    assert np.mean(same) < np.mean(other)


def test_years_are_in_range_and_spread(tiny):
    years = tiny.arrays("train")["year"]
    assert years.min() >= 2015 and years.max() < 2015 + 6
    assert len(set(tiny.class_year.tolist())) > 1
    np.testing.assert_array_equal(years, tiny.class_year[tiny.arrays("train")["label"]])


def test_write_image_folder(tiny, tmp_path):
    labels_csv = tiny.write_image_folder(tmp_path)
    assert labels_csv == os.path.join(tmp_path, "labels.csv")
    with open(labels_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class_id", "class_name", "split", "view", "year", "is_stock"]
    assert len(rows) - 1 == tiny.num_images("train") + tiny.num_images("unseen")
    arrays = tiny.arrays("unseen")
    path, class_id, name, split, view, year, is_stock = rows[-1]
    index = tiny.num_images("unseen") - 1
    assert path == f"images/{class_id:0>3}/unseen_{index:05d}.png" and split == "unseen"
    assert int(class_id) == arrays["label"][index] and name == tiny.class_names[int(class_id)]
    assert int(view) == arrays["view"][index] and int(year) == arrays["year"][index]
    assert bool(int(is_stock)) == arrays["is_stock"][index]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / path)), arrays["image"][index])


def test_image_folder_reads_back_with_read_csv(tiny, tmp_path):
    from fgkeras.data.sources import read_csv

    labels_csv = tiny.write_image_folder(tmp_path, splits=("unseen",))
    images = read_csv(labels_csv, split="unseen")
    assert len(images) == tiny.num_images("unseen")
    np.testing.assert_array_equal(images.views, tiny.arrays("unseen")["view"])
    np.testing.assert_array_equal(images.is_stock, tiny.arrays("unseen")["is_stock"])


def test_as_dataset_element_spec(tiny):
    dataset = tiny.as_dataset("train")
    spec = dataset.element_spec
    assert spec["image"] == tf.TensorSpec((32, 32, 3), tf.uint8)
    for key in ("label", "view", "year"):
        assert spec[key] == tf.TensorSpec((), tf.int32)
    assert spec["is_stock"] == tf.TensorSpec((), tf.bool)
    first = next(iter(dataset))
    np.testing.assert_array_equal(first["image"].numpy(), tiny.arrays("train")["image"][0])


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=16), "image_size"),
    (dict(image_size=300), "image_size"),
    (dict(num_views=4), "num_views"),
    (dict(unseen_fraction=1.0), "unseen_fraction"),
    (dict(stock_fraction=-0.1), "stock_fraction"),
    (dict(num_makes=0), "num_makes"),
    (dict(seed=-1), "seed"),
    (dict(shape_jitter=0.5), "shape_jitter"),
    (dict(min_part_differences=7, part_changes=3), "min_part_differences"),
])
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        SyntheticVehicles(**kwargs)


def test_invalid_split_view_and_class(tiny):
    with pytest.raises(ValueError, match="`split`.*'train', 'unseen'"):
        tiny.classes("test")
    with pytest.raises(ValueError, match="`view`"):
        tiny.render(0, tiny.num_views, 0)
    with pytest.raises(ValueError, match="`class_id`"):
        tiny.render(tiny.num_classes, 0, 0)
    with pytest.raises(ValueError, match="`image_format`"):
        tiny.write_image_folder("unused", image_format="gif")
