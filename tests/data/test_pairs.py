"""FGGAN's pairs (`fgkeras.data.canonical_pairs`) and `SyntheticVehicles(stock_view=...)`."""

import numpy as np
import pytest
from PIL import Image

from fgkeras.data import ImageSet, SyntheticVehicles, canonical_pairs, canonical_rows, image_folder, read_csv


def _numbered_set():
    """12 images whose pixels hold their row: 3 classes, stock photos at views 0 and 2."""
    labels = np.repeat([0, 1, 2], 4)
    views = np.array([0, 0, 3, 5, 0, 2, 1, 4, 2, 2, 6, 7])
    is_stock = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0], bool)
    images = np.repeat(np.arange(12, dtype=np.uint8), 4 * 4 * 3).reshape(12, 4, 4, 3)
    return ImageSet(labels=labels, images=images, views=views, years=None, is_stock=is_stock)


def _rows(batch, key):
    return batch[key].numpy()[:, 0, 0, 0].astype(int)


def test_pairs_are_a_user_photo_and_canonical_photos_of_its_class():
    images = _numbered_set()
    batch = next(iter(canonical_pairs(images, batch_size=32, canonical_view=0, seed=1)))
    real, canonical, positive = (_rows(batch, k) for k in ("image", "canonical", "positive"))
    # class 2 has no stock photo in view 0: its user photos are left out
    assert set(real) == {2, 3, 6, 7}
    np.testing.assert_array_equal(batch["label"].numpy(), images.labels[real])
    for key_rows in (canonical, positive):
        assert images.is_stock[key_rows].all() and (images.views[key_rows] == 0).all()
        np.testing.assert_array_equal(images.labels[key_rows], images.labels[real])
    # class 0 has two canonical photos: x_p is the other one; class 1 has one: x_p = x_c
    zero = images.labels[real] == 0
    assert (positive[zero] != canonical[zero]).all() and (positive[~zero] == canonical[~zero]).all()
    assert batch["image"].shape == (32, 4, 4, 3)


def test_every_user_photo_once_per_pass_in_a_seeded_order():
    images = _numbered_set()
    first = _rows(next(iter(canonical_pairs(images, batch_size=4, canonical_view=2, seed=3))), "image")
    again = _rows(next(iter(canonical_pairs(images, batch_size=4, canonical_view=2, seed=3))), "image")
    assert len(set(first)) == 4 and set(first) <= {2, 3, 6, 7, 10, 11}
    np.testing.assert_array_equal(first, again)


def test_a_canonical_view_that_no_stock_image_has_is_refused():
    with pytest.raises(ValueError, match="No stock image has the canonical view 4: the stock images' views are \\[0, 2\\]"):
        canonical_rows(_numbered_set(), canonical_view=4)


def test_sets_without_view_or_stock_labels_are_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "folder" / name / "x.png")
    with pytest.raises(ValueError, match="no 'view' and no 'is_stock' column \\(an image folder has neither\\)"):
        canonical_pairs(image_folder(tmp_path / "folder"))
    (tmp_path / "labels.csv").write_text("path,class_id,view\nfolder/a/x.png,0,0\nfolder/b/x.png,1,0\n")
    with pytest.raises(ValueError, match="no 'is_stock' column"):
        canonical_pairs(read_csv(tmp_path / "labels.csv"))


def test_stock_photos_are_rendered_at_stock_view():
    tiny = {"image_size": 32, "num_makes": 1, "models_per_make": 2, "images_per_class": 4, "stock_fraction": 0.5,
            "supersample": 1}
    front, side = SyntheticVehicles(**tiny), SyntheticVehicles(stock_view=2, **tiny)
    a, b = front.arrays("train"), side.arrays("train")
    assert (a["view"][a["is_stock"]] == 0).all() and (b["view"][b["is_stock"]] == 2).all()
    np.testing.assert_array_equal(a["image"][~a["is_stock"]], b["image"][~b["is_stock"]])  # user photos unchanged
    assert not np.array_equal(a["image"][a["is_stock"]], b["image"][b["is_stock"]])
    np.testing.assert_array_equal(b["image"][0], side.render(0, 2, 0, stock=True))
    with pytest.raises(ValueError, match="`stock_view` must be an int in \\[0, num_views=8\\). Received: stock_view=8"):
        SyntheticVehicles(stock_view=8)
