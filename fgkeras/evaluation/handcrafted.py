"""Hand-made image features: the floor that a learned embedder must clear on a data set.

A learned embedder that retrieves worse than its images' raw pixels or colour histograms has
memorised its training classes rather than learned what tells classes apart. Both features
are L2-normalised, so `retrieval_metrics` ranks them by cosine similarity as it ranks
embeddings.
"""

import numpy as np
import tensorflow as tf

from fgkeras.evaluation.metrics import retrieval_metrics


def pixel_features(images, side=16):
    """Each image shrunk to `side`×`side` (area average), flattened, centred on its own mean, L2-normalised.

    Args:
        images: uint8 or float array (N, H, W, 3), values 0–255.
        side: the side of the thumbnail.
    Returns: float32 (N, side * side * 3).
    """
    thumbnails = tf.image.resize(np.asarray(images, np.float32), (side, side), method="area").numpy()
    flat = thumbnails.reshape(len(thumbnails), -1)
    flat -= flat.mean(axis=1, keepdims=True)
    return _unit_rows(flat)


def colour_histograms(images, bins=8):
    """Each image's joint RGB histogram (`bins` per channel), square-rooted, L2-normalised.

    The square root makes the cosine of two histograms their Bhattacharyya coefficient
    (Hellinger distance). Pure black pixels are left out: they are the padding that
    `resize_and_pad` adds to images of another aspect ratio.

    Args:
        images: uint8 array (N, H, W, 3).
        bins: bins per channel; the histogram has bins³ cells.
    Returns: float32 (N, bins³).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`images` must have shape (N, H, W, 3). Received: shape={images.shape}")
    cells = (images.astype(np.int64) * bins) // 256
    index = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    counted = images.reshape(len(images), -1, 3).any(axis=-1)
    histograms = np.zeros((len(images), bins ** 3), np.float32)
    rows = np.repeat(np.arange(len(images)), counted.shape[1])
    np.add.at(histograms, (rows[counted.ravel()], index.reshape(-1)[counted.ravel()]), 1.0)
    return _unit_rows(np.sqrt(histograms))


def handcrafted_metrics(imageset, image_size, **metric_kwargs):
    """`retrieval_metrics` of `pixel_features` and `colour_histograms` on `imageset` at `image_size`.

    Returns: `{"pixels": metrics, "colour histogram": metrics}`, the images resized and padded
    as an embedder sees them.
    """
    images, labels = [], []
    for batch in imageset.as_dataset(image_size=image_size, batch_size=256):
        images.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    return {"pixels": retrieval_metrics(pixel_features(images), labels, **metric_kwargs),
            "colour histogram": retrieval_metrics(colour_histograms(images), labels, **metric_kwargs)}


def _unit_rows(matrix):
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


__all__ = ["colour_histograms", "handcrafted_metrics", "pixel_features"]
