"""Convolutional backbones from keras-hub, configured for fine-grained retrieval.

Every backbone here is a `keras_hub.models.Backbone` that maps a batch of images
(already normalised, `(batch, H, W, 3)` float) to a feature map `(batch, h, w, C)`.
Pretrained weights are optional (`preset=`): a local keras-hub preset directory or a
`.weights.h5` file needs no network, a keras-hub preset name downloads; nothing in fgkeras
requires them.
"""

import logging
import os

import keras
import keras_hub

logger = logging.getLogger(__name__)

RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}

# MobileNetV3-Small (Howard et al. 2019, Table 2) after the first depthwise block.
_MOBILENET_V3_SMALL = {
    "stackwise_num_blocks": [2, 3, 2, 3],
    "stackwise_expansion": [[72, 88], [96, 240, 240], [120, 144], [288, 576, 576]],
    "stackwise_num_filters": [[24, 24], [40, 40, 40], [48, 48], [96, 96, 96]],
    "stackwise_kernel_size": [[3, 3], [5, 5, 5], [5, 5], [5, 5, 5]],
    "stackwise_num_strides": [[2, 1], [2, 1, 1], [1, 1], [2, 1, 1]],
    "stackwise_se_ratio": [[None, None], [0.25] * 3, [0.25] * 2, [0.25] * 3],
    "stackwise_activation": [["relu", "relu"], ["hard_swish"] * 3, ["hard_swish"] * 2, ["hard_swish"] * 3],
}


def _scaled(filters, width):
    """Scales a channel count by `width`, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(filters * width / 8)) * 8)


def resnet_backbone(depth=18, width=1.0, image_size=None):
    """A randomly initialised ResNet backbone (He et al. 2016) from keras-hub.

    Args:
        depth: 18 or 34 (basic blocks), 50 or 101 (bottleneck blocks).
        width: channel multiplier of stages 2–4 (keras-hub fixes the stem and
            stage 1 at 64 channels); 1.0 is the published network, 0.25–0.5 suits
            quick CPU experiments.
        image_size: fixed square input size, or None for any size.
    """
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"`depth` must be one of {sorted(RESNET_BLOCKS)}. Received: depth={depth}")
    if width <= 0:
        raise ValueError(f"`width` must be > 0. Received: width={width}")
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        # keras-hub fixes the stem and the first stage at 64 filters.
        stackwise_num_filters=[64] + [_scaled(f, width) for f in (128, 256, 512)],
        stackwise_num_blocks=RESNET_BLOCKS[depth],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block" if depth < 50 else "bottleneck_block",
        use_pre_activation=False,
        image_shape=(image_size, image_size, 3),
        name=f"resnet{depth}",
    )


def mobilenet_backbone(width=1.0, image_size=None):
    """A randomly initialised MobileNetV3-Small backbone, for edge and TFLite use."""
    if width <= 0:
        raise ValueError(f"`width` must be > 0. Received: width={width}")
    config = dict(_MOBILENET_V3_SMALL)
    config["stackwise_num_filters"] = [[_scaled(f, width) for f in stack] for stack in config["stackwise_num_filters"]]
    config["stackwise_expansion"] = [[_scaled(f, width) for f in stack] for stack in config["stackwise_expansion"]]
    return keras_hub.models.MobileNetBackbone(
        **config,
        stackwise_padding=[[1, 1], [2, 2, 2], [2, 2], [2, 2, 2]],
        output_num_filters=_scaled(576, width),
        depthwise_filters=_scaled(16, width),
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=_scaled(576, width),
        squeeze_and_excite=0.5,
        input_num_filters=_scaled(16, width),
        image_shape=(image_size, image_size, 3),
        name="mobilenet_v3_small",
    )


BACKBONES = {
    "resnet18": lambda width, image_size: resnet_backbone(18, width, image_size),
    "resnet34": lambda width, image_size: resnet_backbone(34, width, image_size),
    "resnet50": lambda width, image_size: resnet_backbone(50, width, image_size),
    "mobilenet": mobilenet_backbone,
}


def build_backbone(name="resnet18", width=1.0, image_size=None, preset=None):
    """Builds a backbone by name, or loads pretrained weights.

    Args:
        name: one of `BACKBONES` ("resnet18", "resnet34", "resnet50", "mobilenet").
        width: channel multiplier for the named backbones.
        image_size: fixed square input size, or None.
        preset: where pretrained weights come from, or None for a random initialisation:
            - a local keras-hub preset directory (with `config.json`, as written by
              `backbone.save_to_preset(directory)`): loaded with
              `keras_hub.models.Backbone.from_preset`; `name` and `width` are ignored;
            - a `.weights.h5` file (`backbone.save_weights`) of the backbone that `name` and
              `width` build: built, then loaded;
            - a keras-hub preset name or handle such as "resnet_50_imagenet" (downloads).
    """
    if preset is not None:
        return _pretrained(name, width, image_size, os.fspath(preset))
    if name not in BACKBONES:
        raise ValueError(f"`name` must be one of {sorted(BACKBONES)}. Received: name={name!r}")
    return BACKBONES[name](width, image_size)


def _pretrained(name, width, image_size, preset):
    image_shape = {} if image_size is None else {"image_shape": (image_size, image_size, 3)}
    if os.path.isdir(preset):
        if not os.path.isfile(os.path.join(preset, "config.json")):
            raise ValueError(
                "`preset` is a directory but not a keras-hub preset (no config.json; write one with "
                f"`backbone.save_to_preset(directory)`). Received: preset={preset!r}")
        logger.info("Loading the backbone preset %s", preset)
        return keras_hub.models.Backbone.from_preset(preset, **image_shape)
    if preset.endswith(".weights.h5"):
        if not os.path.isfile(preset):
            raise FileNotFoundError(f"`preset` names a weights file that does not exist. Received: preset={preset!r}")
        backbone = build_backbone(name, width=width, image_size=image_size)
        logger.info("Loading backbone weights from %s", preset)
        backbone.load_weights(preset)
        return backbone
    if os.path.exists(preset):
        raise ValueError(
            "`preset` must be a keras-hub preset directory (with config.json), a backbone `.weights.h5` "
            f"file or a keras-hub preset name. Received: preset={preset!r}, a file that is neither")
    if "://" not in preset and (os.sep in preset or preset.endswith((".h5", ".keras"))):
        raise FileNotFoundError(
            "`preset` looks like a path (a keras-hub preset directory or a `.weights.h5` file) but "
            f"nothing is there. Received: preset={preset!r}")
    logger.info("Loading the keras-hub preset %s (downloads it unless cached)", preset)
    return keras_hub.models.Backbone.from_preset(preset, **image_shape)


def freeze_batch_norm(model):
    """Freezes every batch normalisation inside `model`, in place; returns the number frozen.

    A frozen `BatchNormalization` normalises with its moving statistics and keeps them, γ and β
    fixed (Keras runs a non-trainable BN in inference mode): the fine-tuning recipe for batches
    too small to estimate batch statistics. Other layers stay trainable.
    """
    frozen = 0
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            frozen += 1
        else:
            frozen += freeze_batch_norm(layer)
    return frozen


def feature_maps(backbone):
    """The named intermediate feature maps of a backbone (for local branches such as KPM).

    Returns a dict `{"P2": ..., "P5": ...}` for pyramid backbones, else `{"output": ...}`.
    """
    pyramid = getattr(backbone, "pyramid_outputs", None)
    if pyramid:
        return dict(pyramid)
    return {"output": backbone.output}


__all__ = [
    "BACKBONES",
    "build_backbone",
    "feature_maps",
    "freeze_batch_norm",
    "mobilenet_backbone",
    "resnet_backbone",
]
