"""Keypoint-map overlays (HTG, Sec. 5.3, Fig. 5): where the KPM branch looks.

`keypoint_overlays` writes one PNG grid: a row per image, showing the image, then the
maximum response over channels V_ij = max_c M_cij (eq. 12), then the `num_maps` channel maps
that peak highest on that image, each upsampled to the image and overlaid as a heat map.
"""

import os

import numpy as np
from PIL import Image

# A dark-blue → cyan → yellow → red ramp (piecewise linear), readable over photographs.
_RAMP = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype="float32")


def _heat_colours(values):
    """(h, w) values in [0, 1] → (h, w, 3) float RGB along `_RAMP`."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lower = np.minimum(position.astype("int32"), len(_RAMP) - 2)
    fraction = (position - lower)[..., None]
    return _RAMP[lower] * (1 - fraction) + _RAMP[lower + 1] * fraction


def _to_uint8_image(image):
    image = np.asarray(image, dtype="float32")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"An image must be (H, W, 3). Received shape {image.shape}")
    return np.clip(np.round(image), 0, 255).astype("uint8")


def overlay_heatmap(image, heatmap, alpha=0.6):
    """Overlays a heat map on an image.

    The map is scaled to [0, 1] by its maximum, upsampled (bilinear) to the image size and
    blended in proportion to its value: strong responses are coloured, the rest shows the image.

    Args:
        image: (H, W, 3) values in [0, 255].
        heatmap: (h, w) non-negative values.
        alpha: opacity of the map at its peak, in [0, 1].
    Returns: (H, W, 3) uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={alpha}")
    image = _to_uint8_image(image)
    heatmap = np.asarray(heatmap, dtype="float32")
    if heatmap.ndim != 2:
        raise ValueError(f"`heatmap` must be (h, w). Received shape {heatmap.shape}")
    peak = heatmap.max()
    scaled = heatmap / peak if peak > 0 else np.zeros_like(heatmap)
    height, width = image.shape[:2]
    upsampled = np.asarray(Image.fromarray(scaled).resize((width, height), Image.BILINEAR))
    weight = alpha * np.clip(upsampled, 0.0, 1.0)[..., None]
    blended = image.astype("float32") * (1 - weight) + _heat_colours(upsampled) * weight
    return np.clip(np.round(blended), 0, 255).astype("uint8")


def keypoint_overlays(embedder, images, path, num_maps=4, level=None, cell_size=128, alpha=0.6):
    """Writes a PNG grid of keypoint maps overlaid on their images.

    Row i shows image i, then V (eq. 12: the maximum over channels of the keypoint maps),
    then the `num_maps` channels whose maps peak highest on image i (the most confident
    keypoints), each overlaid with `overlay_heatmap`.

    Args:
        embedder: an embedder with a KPM branch (`fgkeras.models.htg.KeypointEmbedder`, or
            anything with `keypoint_maps(images) -> {level: (batch, h, w, C)}` and `levels`).
        images: (batch, H, W, 3) values in [0, 255] (uint8 or float).
        path: the PNG file to write (parent folders are created).
        num_maps: channel maps per image after V, >= 0 (at most C).
        level: the keypoint block to show; the first of `embedder.levels` (the finest) by default.
        cell_size: side of each cell in pixels (images are resized to it).
        alpha: opacity of the maps at their peak.
    Returns: `path`.
    """
    if not hasattr(embedder, "keypoint_maps"):
        raise ValueError(
            "Keypoint overlays need an embedder with a KPM branch (fgkeras.models.htg.KeypointEmbedder). "
            f"Received: {type(embedder).__name__}"
        )
    if num_maps < 0:
        raise ValueError(f"`num_maps` must be >= 0. Received: num_maps={num_maps}")
    if cell_size < 1:
        raise ValueError(f"`cell_size` must be >= 1. Received: cell_size={cell_size}")
    level = level or embedder.levels[0]
    if level not in embedder.levels:
        raise ValueError(f"`level` must be one of {list(embedder.levels)}. Received: level={level!r}")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"`images` must be (batch, H, W, 3). Received shape {images.shape}")
    maps = np.asarray(embedder.keypoint_maps(images)[level])  # (batch, h, w, C)
    num_maps = min(num_maps, maps.shape[-1])
    rows = []
    for image, image_maps in zip(images, maps):
        cell = np.asarray(Image.fromarray(_to_uint8_image(image)).resize((cell_size, cell_size), Image.BILINEAR))
        strongest = np.argsort(-image_maps.max(axis=(0, 1)), kind="stable")[:num_maps]
        heatmaps = [image_maps.max(axis=-1)] + [image_maps[..., c] for c in strongest]
        rows.append(np.concatenate([cell] + [overlay_heatmap(cell, h, alpha) for h in heatmaps], axis=1))
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, format="PNG")
    return path
