import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fgkeras.data import Augment, ImageDecodeError, ImageSet, resize_and_pad, to_supervised

# Class sizes of the in-memory set: class 3 is smaller than K=4, class 4 has one image.
COUNTS = (6, 5, 4, 3, 1, 5)


@pytest.fixture
def memory_set(rng):
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    num = len(labels)
    return ImageSet(
        labels=labels,
        images=rng.integers(0, 256, (num, 8, 8, 3), dtype=np.uint8),
        views=labels % 2,
        years=np.arange(num),  # a row id: tells which rows a batch holds
        is_stock=labels == 0,
        class_names=[f"class {i}" for i in range(len(COUNTS))],
    )


def write_image(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


@pytest.fixture
def file_set(tmp_path, rng):
    paths = [
        write_image(tmp_path / f"{i}.png", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
        for i in range(6)
    ]
    return ImageSet(labels=[0, 0, 1, 1, 2, 2], paths=paths)


def pk_batches(dataset, count):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset.take(count)]


# -- validation ------------------------------------------------------------------------

IMAGES = np.zeros((2, 4, 4, 3), np.uint8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=[0, 1]), "Exactly one of `images` or `paths`"),
        (dict(labels=[0, 1], images=IMAGES, paths=["a", "b"]), "Exactly one of `images` or `paths`"),
        (dict(labels=[0, 1], images=IMAGES.astype(np.float32)), "`images` must be uint8"),
        (dict(labels=[0, 1], images=IMAGES[..., :1]), r"\(N, H, W, 3\)"),
        (dict(labels=[0, 1, 1], images=IMAGES), "`images` must have one entry per label"),
        (dict(labels=[[0, 1]], images=IMAGES), "`labels` must be 1-D"),
        (dict(labels=[0.0, 1.0], images=IMAGES), "`labels` must hold integers"),
        (dict(labels=[0, -1], images=IMAGES), "must be >= 0"),
        (dict(labels=[0, 1], images=IMAGES, views=[0]), "`views` must have one entry per label"),
        (dict(labels=[0, 1], images=IMAGES, years=[2012.5, 2013.0]), "`years` must hold integers"),
        (dict(labels=[0, 1], images=IMAGES, is_stock=[0, 2]), "`is_stock` must hold booleans"),
        (dict(labels=[0, 3], images=IMAGES, class_names=["a", "b"]), "`class_names` has 2 names"),
        (dict(labels=[0, 1], paths="a.jpg"), "not a single string"),
        (dict(labels=[0, 1], paths=["a.jpg"]), "`paths` must have one entry per label"),
    ],
)
def test_invalid_columns_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageSet(**kwargs)


def test_columns_are_coerced(memory_set):
    assert memory_set.labels.dtype == np.int32
    assert memory_set.views.dtype == np.int32
    assert memory_set.is_stock.dtype == bool
    assert len(memory_set) == sum(COUNTS)
    assert memory_set.num_classes == len(COUNTS)
    assert ImageSet(labels=[0, 4], images=IMAGES).num_classes == 5


# -- subsets ---------------------------------------------------------------------------


def test_subset_by_indices_and_mask(memory_set):
    by_index = memory_set.subset([3, 0])
    np.testing.assert_array_equal(by_index.years, [3, 0])
    np.testing.assert_array_equal(by_index.images[0], memory_set.images[3])
    by_mask = memory_set.subset(memory_set.labels == 1)
    np.testing.assert_array_equal(by_mask.labels, [1] * COUNTS[1])
    assert by_mask.class_names == memory_set.class_names
    assert len(memory_set.subset([])) == 0


@pytest.mark.parametrize("selector", [[True, False], [0.5], [0, 100]])
def test_subset_rejects_bad_selectors(memory_set, selector):
    with pytest.raises(ValueError, match="indices_or_mask|boolean mask"):
        memory_set.subset(selector)


def test_split_by_classes_keeps_labels(memory_set):
    part = memory_set.split_by_classes([1, 5])
    np.testing.assert_array_equal(part.classes, [1, 5])
    assert len(part) == COUNTS[1] + COUNTS[5]
    assert part.num_classes == len(COUNTS)  # the label space is kept


def test_relabeled_makes_labels_contiguous(memory_set):
    part = memory_set.split_by_classes([5, 2]).relabeled()
    np.testing.assert_array_equal(part.labels, [0] * COUNTS[2] + [1] * COUNTS[5])
    assert part.class_names == ["class 2", "class 5"] and part.num_classes == 2


# -- as_dataset ------------------------------------------------------------------------


def test_as_dataset_element_spec(memory_set):
    dataset = memory_set.as_dataset(batch_size=4)
    spec = dataset.element_spec
    assert set(spec) == {"image", "label", "view", "year", "is_stock"}
    assert spec["image"].dtype == tf.uint8 and spec["image"].shape.as_list() == [None, 8, 8, 3]
    assert spec["label"].dtype == tf.int32
    assert spec["view"].dtype == tf.int32 and spec["is_stock"].dtype == tf.bool
    first = next(iter(dataset))
    np.testing.assert_array_equal(first["image"], memory_set.images[:4])
    np.testing.assert_array_equal(first["year"], [0, 1, 2, 3])


def test_file_set_requires_image_size_to_batch(file_set):
    with pytest.raises(ValueError, match="image_size"):
        file_set.as_dataset(batch_size=2)
    sizes = {tuple(element["image"].shape) for element in file_set.as_dataset()}
    assert sizes == {(12, 10, 3)}


def test_resize_pads_to_square_keeping_aspect(tmp_path):
    tall = np.full((40, 20, 3), 200, np.uint8)  # H=40, W=20 -> 16x8 centred in 16x16
    sets = [
        ImageSet(labels=[0], images=tall[None]),
        ImageSet(labels=[0], paths=[write_image(tmp_path / "tall.png", tall)]),
    ]
    for image_set in sets:
        image = next(iter(image_set.as_dataset(image_size=16)))["image"].numpy()
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image[:, :4], 0)
        np.testing.assert_array_equal(image[:, 12:], 0)
        np.testing.assert_array_equal(image[:, 4:12], 200)


def test_resize_and_pad_wide_image_pads_rows():
    wide = tf.fill([10, 30, 3], tf.constant(90, tf.uint8))
    image = resize_and_pad(wide, 15).numpy()  # 5x15 centred: rows 5..9
    np.testing.assert_array_equal(image[:5], 0)
    np.testing.assert_array_equal(image[10:], 0)
    np.testing.assert_array_equal(image[5:10], 90)


def test_shuffle_is_deterministic_per_seed(memory_set):
    def order(**kwargs):
        return np.concatenate([b["year"].numpy() for b in memory_set.as_dataset(batch_size=8, **kwargs)])

    np.testing.assert_array_equal(order(), np.arange(len(memory_set)))
    first = order(shuffle=True, seed=3)
    np.testing.assert_array_equal(first, order(shuffle=True, seed=3))
    assert sorted(first) == list(range(len(memory_set)))
    assert not np.array_equal(first, order(shuffle=True, seed=4))
    assert not np.array_equal(first, np.arange(len(memory_set)))


def test_augmented_dataset_is_deterministic_per_seed(memory_set):
    def images(seed):
        dataset = memory_set.as_dataset(batch_size=len(memory_set), seed=seed, augment=Augment.standard())
        return next(iter(dataset))["image"].numpy()

    np.testing.assert_array_equal(images(1), images(1))
    assert not np.array_equal(images(1), images(2))
    assert not np.array_equal(images(1), memory_set.images)


def test_to_supervised(memory_set):
    image, label = next(iter(to_supervised(memory_set.as_dataset(batch_size=3))))
    assert image.shape == (3, 8, 8, 3) and label.dtype == tf.int32


def test_dataset_distributes_with_mirrored_strategy(memory_set):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    dataset = memory_set.class_balanced_dataset(2, 2, seed=0)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    assert batch["image"].shape == (4, 8, 8, 3)


# -- P×K batches -----------------------------------------------------------------------


def test_class_balanced_batches_hold_p_classes_of_k(memory_set):
    num_p, num_k = 3, 4
    batches = pk_batches(memory_set.class_balanced_dataset(num_p, num_k, seed=0), 30)
    rows_of_class = {c: set(np.flatnonzero(memory_set.labels == c)) for c in range(len(COUNTS))}
    seen = set()
    for batch in batches:
        assert batch["image"].shape == (num_p * num_k, 8, 8, 3)
        np.testing.assert_array_equal(batch["image"], memory_set.images[batch["year"]])
        groups = batch["label"].reshape(num_p, num_k)
        assert len(set(groups[:, 0])) == num_p  # P distinct classes...
        assert (groups == groups[:, :1]).all()  # ...each K times, class by class
        for label, rows in zip(groups[:, 0], batch["year"].reshape(num_p, num_k)):
            seen.add(label)
            if COUNTS[label] >= num_k:
                assert len(set(rows)) == num_k  # without replacement
            else:
                assert set(rows) == rows_of_class[label]  # every image, then repeats
    assert seen == set(range(len(COUNTS)))


def test_class_balanced_is_deterministic_and_varies_across_batches(memory_set):
    def years(seed):
        dataset = memory_set.class_balanced_dataset(2, 3, seed=seed)
        return np.stack([batch["year"] for batch in pk_batches(dataset, 6)])

    first = years(7)
    np.testing.assert_array_equal(first, years(7))
    assert not np.array_equal(first, years(8))
    assert len({tuple(batch) for batch in first}) > 1


def test_class_balanced_from_a_start_batch_is_the_rest_of_the_stream(memory_set):
    # A resumed run starts the stream at the batch of its checkpoint (`fit_resumable`).
    whole = pk_batches(memory_set.class_balanced_dataset(2, 3, seed=7), 6)
    rest = pk_batches(memory_set.class_balanced_dataset(2, 3, seed=7, start=4), 2)
    for mine, theirs in zip(rest, whole[4:]):
        np.testing.assert_array_equal(mine["image"], theirs["image"])
        np.testing.assert_array_equal(mine["label"], theirs["label"])
    assert not np.array_equal(rest[0]["label"], whole[0]["label"]) or not np.array_equal(
        rest[0]["image"], whole[0]["image"])
    with pytest.raises(ValueError, match="`start` must be an integer >= 0"):
        memory_set.class_balanced_dataset(2, 3, start=-1)


def test_class_balanced_warns_once_about_single_image_classes(memory_set, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = memory_set.class_balanced_dataset(len(COUNTS), 2, seed=0)
        batch = pk_batches(dataset, 1)[0]
    assert sum("single image" in record.message for record in caplog.records) == 1
    single = batch["year"][batch["label"] == 4]
    np.testing.assert_array_equal(single, [np.flatnonzero(memory_set.labels == 4)[0]] * 2)


def test_class_balanced_rejects_too_many_classes(memory_set):
    with pytest.raises(ValueError, match="classes_per_batch.*6"):
        memory_set.class_balanced_dataset(7, 2)
    with pytest.raises(ValueError, match="images_per_class"):
        memory_set.class_balanced_dataset(2, 0)
    with pytest.raises(ValueError, match="classes_per_batch"):
        memory_set.split_by_classes([0]).class_balanced_dataset(2, 2)


def test_class_balanced_with_augmentation_and_files(file_set):
    dataset = file_set.class_balanced_dataset(2, 2, image_size=16, seed=1, augment=Augment.standard())
    batch = pk_batches(dataset, 1)[0]
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], pk_batches(dataset, 1)[0]["image"])


# -- corrupt and missing files ---------------------------------------------------------


def corrupt_file(tmp_path, kind, rng):
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "truncated":
        write_image(path, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), quality=90)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "random":
        path.write_bytes(rng.bytes(600))
    return str(path)  # "missing": never written


@pytest.mark.parametrize("kind", ["truncated", "random", "missing"])
def test_corrupt_file_error_names_the_file(file_set, tmp_path, rng, kind):
    bad = corrupt_file(tmp_path, kind, rng)
    image_set = ImageSet(labels=[*file_set.labels, 0], paths=[*file_set.paths, bad])
    with pytest.raises(ImageDecodeError, match=f"cannot decode image '{bad}'") as error:
        image_set.as_dataset(image_size=8)
    assert error.value.paths == [bad]
    if kind == "missing":
        assert "file not found" in str(error.value)


def test_skip_corrupt_skips_and_counts(file_set, tmp_path, rng, caplog):
    bad = [corrupt_file(tmp_path, kind, rng) for kind in ("truncated", "random", "missing")]
    image_set = ImageSet(labels=[*file_set.labels, 0, 1, 2], paths=[*file_set.paths, *bad])
    with caplog.at_level(logging.WARNING):
        dataset = image_set.as_dataset(image_size=8, batch_size=100, skip_corrupt=True)
    assert next(iter(dataset))["image"].shape[0] == len(file_set)
    assert any("Skipped 3 of 9" in record.message for record in caplog.records)
    assert sorted(c.path for c in image_set.validate(skip_corrupt=True)) == sorted(bad)
    with pytest.raises(ImageDecodeError, match="3 of 9 images are unreadable"):
        image_set.validate()
    # A subset inherits the cached check.
    assert [c.path for c in image_set.subset([0, 6]).validate(skip_corrupt=True)] == [bad[0]]
    batch = pk_batches(image_set.class_balanced_dataset(3, 2, image_size=8, skip_corrupt=True), 1)[0]
    assert batch["image"].shape == (6, 8, 8, 3)
