import keras
import numpy as np

from fgkeras.data import SyntheticVehicles
from fgkeras.data.views import render_views
from fgkeras.evaluation.identity import (
    few_shot,
    format_few_shot_rows,
    format_identity_rows,
    identity_preservation,
    knn_top_k,
    mean_interval,
)


def test_knn_top_k_ranks_distinct_classes():
    gallery = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], "float32")
    labels = np.array([0, 0, 1, 2])
    queries = np.array([[1, 0.05], [0.1, 1]], "float32")
    assert knn_top_k(gallery, labels, queries, [1, 1], ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}


def test_mean_interval():
    assert mean_interval([0.5]) == (0.5, 0.0)
    mean, half = mean_interval([0.4, 0.6])
    assert mean == 0.5 and abs(half - 1.96 * np.std([0.4, 0.6], ddof=1) / np.sqrt(2)) < 1e-12


class _Pixels(keras.layers.Layer):
    """A feature 'extractor' of raw pixels, and a view 'classifier' that knows the truth."""

    def call(self, images):
        return keras.ops.reshape(images, (keras.ops.shape(images)[0], -1))


def test_identity_preservation_of_the_renderer_truth_is_perfect():
    vehicles = SyntheticVehicles(image_size=32, num_makes=2, models_per_make=2, supersample=1)
    arrays = render_views(vehicles, "unseen", instances_per_class=3, views=[0, 2])
    lookup = {arrays["image"][i].tobytes(): i for i in range(len(arrays["label"]))}

    def oracle(images, targets):  # the renderer's true image of the same instance in the target view
        index = np.array([lookup[np.asarray(im, np.uint8).tobytes()] for im in images])
        return arrays["image"][index - arrays["view"][index] + np.asarray(targets)]

    class Views(keras.layers.Layer):
        def call(self, images):
            index = [lookup[np.asarray(im, np.uint8).tobytes()] for im in keras.ops.convert_to_numpy(images)]
            return keras.ops.one_hot(arrays["view"][index], 2)

    rows = identity_preservation(oracle, _Pixels(), Views(), arrays, num_classes=(2,), seed=1)
    assert rows[0]["pixel_distance"] == 0 and abs(rows[0]["feature_distance"]) < 1e-6
    assert rows[0]["view_accuracy"] == 1.0 and rows[0]["num_classes"] == 2
    copy = identity_preservation(lambda images, targets: images, _Pixels(), Views(), arrays, num_classes=(2,), seed=1)
    assert copy[0]["view_accuracy"] == 0.5 and copy[0]["pixel_distance"] > 0.01  # copying keeps half the views
    assert "| truth | 2 |" in format_identity_rows({"truth": rows})


def test_few_shot_runs_with_and_without_augmentation():
    vehicles = SyntheticVehicles(image_size=32, num_makes=2, models_per_make=2, supersample=1)
    arrays = render_views(vehicles, "unseen", instances_per_class=4, views=[0, 2])

    def copies(images):
        return np.repeat(images, 2, axis=0), np.repeat(np.arange(len(images)), 2), None

    rows = few_shot(copies, arrays, num_classes=2, shots=(2,), repeats=1, steps=2)
    assert rows[0]["shots"] == 2 and len(rows[0]["runs"]["with"]) == 1 and 0 <= rows[0]["with"][0] <= 1
    assert "2-way 2-shot" in format_few_shot_rows(rows)
