import numpy as np
import pytest

from fgkeras.models import BACKBONES, build_backbone, feature_maps


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
