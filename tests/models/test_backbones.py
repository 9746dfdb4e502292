import keras
import numpy as np
import pytest

from fgkeras.models import BACKBONES, build_backbone, feature_maps, freeze_batch_norm


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_maps_images_to_a_feature_map(name):
    backbone = build_backbone(name, width=0.25, image_size=32)
    out = backbone(np.zeros((2, 32, 32, 3), "float32"))
    assert out.shape[0] == 2 and len(out.shape) == 4
    assert np.all(np.isfinite(np.asarray(out)))


def test_width_shrinks_resnet():
    narrow = build_backbone("resnet18", width=0.25, image_size=32)
    full = build_backbone("resnet18", width=1.0, image_size=32)
    assert narrow.output_shape[-1] == 128
    assert full.output_shape[-1] == 512
    assert narrow.count_params() < full.count_params() / 5


def test_resnet_exposes_intermediate_blocks_for_local_branches():
    maps = feature_maps(build_backbone("resnet18", width=0.25, image_size=64))
    assert list(maps) == ["P2", "P3", "P4", "P5"]
    assert maps["P4"].shape[1:3] == (4, 4)


def test_any_input_size_when_image_size_is_none():
    backbone = build_backbone("resnet18", width=0.25)
    assert backbone(np.zeros((1, 64, 64, 3), "float32")).shape[1:3] == (2, 2)
    assert backbone(np.zeros((1, 96, 96, 3), "float32")).shape[1:3] == (3, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "vgg"}, "`name` must be one of"),
    ({"name": "resnet18", "width": 0}, "`width` must be > 0"),
])
def test_bad_backbone_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(**kwargs)


def _equal_weights(first, second):
    return len(first.weights) == len(second.weights) and all(
        np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))


def test_a_local_keras_hub_preset_directory_loads_without_the_network(tmp_path):
    saved = build_backbone("resnet18", width=0.25, image_size=32)
    saved.save_to_preset(str(tmp_path / "preset"))
    loaded = build_backbone("mobilenet", width=1.0, image_size=48, preset=str(tmp_path / "preset"))
    assert type(loaded) is type(saved) and _equal_weights(loaded, saved)  # name and width ignored
    assert loaded.input_shape[1:3] == (48, 48)  # the image size asked for, same weights
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(build_backbone(preset=tmp_path / "preset", image_size=32)(images)),
                               np.asarray(saved(images)), atol=1e-5)


def test_a_weights_file_loads_into_the_named_backbone(tmp_path):
    saved = build_backbone("resnet18", width=0.25, image_size=32)
    path = str(tmp_path / "backbone.weights.h5")
    saved.save_weights(path)
    loaded = build_backbone("resnet18", width=0.25, image_size=32, preset=path)
    fresh = build_backbone("resnet18", width=0.25, image_size=32)
    assert _equal_weights(loaded, saved) and not _equal_weights(fresh, saved)


def test_a_preset_path_that_is_neither_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a file that is neither"):
        build_backbone(preset=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="no config.json"):
        build_backbone(preset=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(preset=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(FileNotFoundError, match="nothing is there"):
        build_backbone(preset=str(tmp_path / "missing_preset"))


def test_freeze_batch_norm_freezes_every_batch_norm_and_nothing_else():
    backbone = build_backbone("resnet18", width=0.25, image_size=32)
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    trainable_before = len(backbone.trainable_weights)
    assert freeze_batch_norm(backbone) == len(norms) > 0
    assert not any(layer.trainable for layer in norms)
    assert len(backbone.trainable_weights) == trainable_before - 2 * len(norms)  # γ and β of each
    moving = [np.asarray(layer.moving_mean).copy() for layer in norms]
    backbone(np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32") * 50, training=True)
    assert all(np.array_equal(before, np.asarray(layer.moving_mean)) for before, layer in zip(moving, norms))
