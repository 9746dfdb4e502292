import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fgkeras.data import image_folder, read_csv, tfds_images

RED = (200, 30, 10)


def write_image(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """root/<class>/<image> with JPEG, PNG, grayscale and RGBA images, plus files to ignore."""
    root = tmp_path / "images"
    rgb = np.zeros((12, 16, 3), np.uint8) + np.array(RED, np.uint8)
    write_image(root / "zebra" / "a.jpg", rgb, quality=95)
    write_image(root / "zebra" / "b.PNG", rgb)
    write_image(root / "apple" / "gray.png", np.full((10, 10), 77, np.uint8))
    rgba = np.zeros((10, 10, 4), np.uint8) + np.array((*RED, 128), np.uint8)
    write_image(root / "apple" / "rgba.png", rgba)
    write_image(root / "mango" / "c.jpeg", rgb)
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "apple" / ".hidden.png").write_bytes(b"not an image")
    write_image(root / ".cache" / "x.png", rgb)
    return root


def test_image_folder_reads_classes_sorted(folder):
    image_set = image_folder(folder)
    assert image_set.class_names == ["apple", "mango", "zebra"]
    np.testing.assert_array_equal(image_set.labels, [0, 0, 1, 2, 2])
    names = [os.path.basename(p) for p in image_set.paths]
    assert names == ["gray.png", "rgba.png", "c.jpeg", "a.jpg", "b.PNG"]


def test_image_folder_decodes_every_format_to_rgb(folder):
    image_set = image_folder(folder)
    images = next(iter(image_set.as_dataset(image_size=10, batch_size=5)))["image"].numpy()
    assert images.shape == (5, 10, 10, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], 77)  # grayscale -> 3 equal channels
    np.testing.assert_array_equal(images[1], np.broadcast_to(RED, (10, 10, 3)))  # alpha dropped
    np.testing.assert_allclose(images[4, 3:7].reshape(-1, 3).mean(0), RED, atol=2)  # PNG, padded
    np.testing.assert_array_equal(images[4, 0], 0)


def test_image_folder_with_class_names_and_errors(folder, tmp_path):
    image_set = image_folder(folder, class_names=["zebra", "apple"])
    np.testing.assert_array_equal(image_set.labels, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="not found.*'pear'"):
        image_folder(folder, class_names=["pear"])
    with pytest.raises(ValueError, match="Image folder not found"):
        image_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="No classes found"):
        image_folder(tmp_path / "empty")


def write_csv(path, header, rows):
    path.write_text("\n".join([header] + [",".join(map(str, row)) for row in rows]) + "\n")
    return path


@pytest.fixture
def csv_file(tmp_path):
    """Original ids 12, 5, 7 (not contiguous; numeric order differs from text order)."""
    gray = np.full((8, 8), 50, np.uint8)
    rows = []
    classes = [(12, "Zonda", "train"), (5, "Alpha", "train"), (7, "Beta", "test")]
    for i, (class_id, name, split) in enumerate(classes + [classes[0], (5, "Alpha", "test")]):
        write_image(tmp_path / "data" / "img" / f"{i}.png", gray)
        rows.append((f"img/{i}.png", class_id, name, split, i % 3, 2000 + i, i % 2))
    header = "path,class_id,class_name,split,view,year,is_stock"
    return write_csv(tmp_path / "data" / "labels.csv", header, rows)


def test_read_csv_remaps_classes_in_numeric_order(csv_file):
    image_set = read_csv(csv_file)
    assert image_set.class_names == ["Alpha", "Beta", "Zonda"]  # ids 5, 7, 12
    np.testing.assert_array_equal(image_set.labels, [2, 0, 1, 2, 0])
    np.testing.assert_array_equal(image_set.views, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(image_set.years, [2000, 2001, 2002, 2003, 2004])
    np.testing.assert_array_equal(image_set.is_stock, [False, True, False, True, False])
    assert image_set.paths[0] == os.path.join(str(csv_file.parent), "img", "0.png")
    element = next(iter(image_set.as_dataset()))
    assert set(element) == {"image", "label", "view", "year", "is_stock"}


def test_read_csv_split_filter_and_root(csv_file, tmp_path):
    train = read_csv(csv_file, split="train")
    assert train.class_names == ["Alpha", "Zonda"]
    np.testing.assert_array_equal(train.labels, [1, 0, 1])
    moved = read_csv(csv_file, root=tmp_path / "elsewhere")
    assert moved.paths[0] == os.path.join(str(tmp_path), "elsewhere", "img", "0.png")
    with pytest.raises(ValueError, match="No rows with split 'val'.*'test', 'train'"):
        read_csv(csv_file, split="val")


def test_read_csv_without_names_keeps_original_ids(tmp_path):
    csv_file = write_csv(tmp_path / "l.csv", "path,class_id", [("a.png", 30), ("b.png", 4)])
    image_set = read_csv(csv_file)
    assert image_set.class_names == ["4", "30"]
    np.testing.assert_array_equal(image_set.labels, [1, 0])


@pytest.mark.parametrize(
    "header, rows, kwargs, match",
    [
        ("file,class_id", [("a.png", 1)], {}, "Column 'path' is missing from '.*l.csv'"),
        ("path,label", [("a.png", 1)], {}, "Column 'class_id' is missing"),
        ("path,class_id", [("a.png", 1)], {"split": "train"}, "Column 'split' is missing"),
        ("path,class_id", [("a.png", "")], {}, "Empty 'class_id' in '.*l.csv', line 2"),
        ("path,class_id,year", [("a.png", 1, "new")], {}, "'year' must hold integers.*line 2"),
    ],
)
def test_read_csv_errors_name_column_and_file(tmp_path, header, rows, kwargs, match):
    csv_file = write_csv(tmp_path / "l.csv", header, rows)
    with pytest.raises(ValueError, match=match):
        read_csv(csv_file, **kwargs)


def test_read_csv_cars196_train_split(cars196_root):
    image_set = read_csv(os.path.join(cars196_root, "labels.csv"), split="train")
    assert len(image_set) == 4052
    assert len(image_set.classes) == 98 and image_set.num_classes == 98
    assert image_set.class_names[13] == "Audi TTS Coupe 2012"  # original id 14
    first = image_set.subset(np.arange(8))
    batch = next(iter(first.as_dataset(image_size=64, batch_size=8)))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].numpy().dtype == np.uint8
    assert batch["image"].numpy().std() > 10  # real pictures, not padding


def mock_tfds(num_examples=6):
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def test_tfds_images_resizes_variable_sizes():
    with mock_tfds():
        image_set = tfds_images("cars196", "train", image_size=24, max_examples=4)
    assert image_set.images.shape == (4, 24, 24, 3)
    assert len(image_set.class_names) == 196 and image_set.labels.dtype == np.int32
    with mock_tfds(), pytest.raises(ValueError, match="different sizes.*image_size"):
        tfds_images("cars196", "train")


def test_tfds_images_grayscale_becomes_rgb():
    with mock_tfds():
        image_set = tfds_images("mnist", "train")
    assert image_set.images.shape == (6, 28, 28, 3)
    np.testing.assert_array_equal(image_set.images[..., 0], image_set.images[..., 2])
    assert image_set.class_names == [str(i) for i in range(10)]
    with mock_tfds(), pytest.raises(ValueError, match="no feature 'species'"):
        tfds_images("mnist", "train", label_key="species")


def test_read_csv_rejects_conflicting_class_names(tmp_path):
    csv_file = write_csv(tmp_path / "l.csv", "path,class_id,class_name", [("a.png", 1, "A"), ("b.png", 1, "B")])
    with pytest.raises(ValueError, match="Class 1 is named both 'A' and 'B'.*line 3"):
        read_csv(csv_file)
