"""Embeddings for TensorBoard's projector: `write_projector(log_dir, embeddings, metadata, images)`.

TensorBoard's projector reads a `projector_config.pbtxt` in the log directory that names a tensor
of a checkpoint, a TSV of labels, one row a point, and optionally a sprite: one PNG holding every
point's thumbnail on a square grid, in the order of the rows. `tensorboard --logdir LOG_DIR` then
shows the embeddings in PCA, t-SNE or UMAP, coloured and searchable by the labels.
"""

import math
import os

import numpy as np

from fgkeras._files import write_atomic

TENSOR_NAME = "embeddings"
METADATA = "metadata.tsv"
SPRITE = "sprite.png"
CHECKPOINT = "embeddings.ckpt"
# TensorBoard refuses sprites larger than 8192 px a side.
MAX_SPRITE_SIDE = 8192


def write_projector(log_dir, embeddings, metadata, images=None, thumbnail=32):
    """Writes the embeddings, their labels and their thumbnails where TensorBoard's projector finds them.

    Args:
        log_dir: the directory to pass to `tensorboard --logdir` (created).
        embeddings: float array (N, D).
        metadata: `{column: N values}`, e.g. `{"label": ..., "view": ...}`; one TSV column each.
        images: optional uint8 array (N, H, W, 3): the sprite's thumbnails, resized to `thumbnail` px.
        thumbnail: the side of one thumbnail in the sprite; lowered so that the sprite fits 8192 px.

    Returns:
        The path of `projector_config.pbtxt`.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array. Received shape: {embeddings.shape}")
    for column, values in metadata.items():
        if len(values) != len(embeddings):
            raise ValueError(f"metadata column {column!r} has {len(values)} values for {len(embeddings)} embeddings")
    os.makedirs(log_dir, exist_ok=True)

    # `save` also writes the `checkpoint` state file, by which the projector finds the latest one
    # in its log directory: the folder can then be moved as a whole.
    checkpoint = tf.train.Checkpoint(**{TENSOR_NAME: tf.Variable(embeddings)})
    checkpoint.save(os.path.join(log_dir, CHECKPOINT))
    write_atomic(os.path.join(log_dir, METADATA), _metadata_tsv(metadata).encode("utf-8"))

    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = f"{TENSOR_NAME}/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = METADATA
    if images is not None:
        if len(images) != len(embeddings):
            raise ValueError(f"{len(images)} images for {len(embeddings)} embeddings")
        sprite, side = sprite_image(images, thumbnail)
        write_atomic(os.path.join(log_dir, SPRITE), _png(sprite))
        embedding.sprite.image_path = SPRITE
        embedding.sprite.single_image_dim.extend([side, side])
    projector.visualize_embeddings(log_dir, config)
    return os.path.join(log_dir, "projector_config.pbtxt")


def _metadata_tsv(metadata):
    """One header row (when there is more than one column, as the projector expects), a row a point."""
    columns = list(metadata)
    rows = zip(*(metadata[column] for column in columns))
    lines = ["\t".join(columns)] if len(columns) > 1 else []
    lines += ["\t".join(_cell(value) for value in row) for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value):
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.replace("\t", " ").replace("\n", " ")


def sprite_image(images, thumbnail=32):
    """`(sprite, side)`: the images resized to `side` px, row-major on a square grid (uint8)."""
    import tensorflow as tf

    count = len(images)
    columns = math.ceil(math.sqrt(count))
    side = max(1, min(thumbnail, MAX_SPRITE_SIDE // columns))
    small = tf.image.resize(np.asarray(images), (side, side), antialias=True)
    small = np.clip(np.round(small.numpy()), 0, 255).astype(np.uint8)
    grid = np.zeros((columns * columns, side, side, 3), np.uint8)
    grid[:count] = small
    sprite = grid.reshape(columns, columns, side, side, 3).transpose(0, 2, 1, 3, 4)
    return sprite.reshape(columns * side, columns * side, 3), side


def _png(image):
    import tensorflow as tf

    return tf.io.encode_png(image).numpy()
