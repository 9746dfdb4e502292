"""Embedding a tf.data dataset of image dicts with a model, metadata alongside."""

import weakref
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm


def embed_dataset(model, dataset, batch_size=None, verbose=True):
    """Runs `model` over every image of `dataset` and gathers embeddings and metadata.

    Args:
        model: a `keras.Model` (run in inference mode by a traced call), a
            Keras layer (called with `training=False`), or any callable mapping an
            image batch (batch, H, W, C) to embeddings (batch, dim).
        dataset: a `tf.data.Dataset` whose elements are dicts with an `"image"`
            ((H, W, C), or (batch, H, W, C) when batched), a `"label"`, and any
            metadata (`"view"`, `"year"`, `"is_stock"`, ...).
        batch_size: positive int. An unbatched dataset is batched by it (default
            64); a batched one is re-batched by it when given.
        verbose: whether to show a progress bar.
    Returns:
        `{"embeddings": (N, dim) float32, "label": (N,), ...}`: one array per key of
        the elements except `"image"`, in dataset order.
    """
    spec = dataset.element_spec if isinstance(dataset, tf.data.Dataset) else None
    if not isinstance(spec, Mapping) or "image" not in spec or "label" not in spec:
        raise ValueError(
            "`dataset` must be a tf.data.Dataset of dicts with 'image' and 'label'. "
            f"Received element_spec={spec!r}"
        )
    image_rank = spec["image"].shape.rank
    if image_rank not in (3, 4):
        raise ValueError(
            "`dataset` images must be (H, W, C) or batched (batch, H, W, C). "
            f"Received image shape {spec['image'].shape}"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be a positive int or None. Received: batch_size={batch_size!r}")
    if image_rank == 3:
        dataset = dataset.batch(batch_size or 64)
    elif batch_size is not None:
        dataset = dataset.unbatch().batch(batch_size)
    embed = _inference_fn(model)

    outputs = {"embeddings": []}
    num_batches = int(dataset.cardinality())
    total = num_batches if num_batches >= 0 else None
    for batch in tqdm(dataset, total=total, unit="batch", desc="embedding", disable=not verbose):
        embeddings = np.asarray(embed(batch["image"]), dtype=np.float32)
        num_images = int(tf.shape(batch["image"])[0])
        if embeddings.ndim != 2 or len(embeddings) != num_images:
            raise ValueError(
                f"`model` must map {num_images} images to ({num_images}, dim) embeddings. "
                f"Received an output of shape {embeddings.shape}"
            )
        outputs["embeddings"].append(embeddings)
        for key, value in batch.items():
            if key != "image":
                outputs.setdefault(key, []).append(value.numpy())
    if not outputs["embeddings"]:
        raise ValueError("`dataset` is empty: there is nothing to embed.")
    return {key: np.concatenate(values) for key, values in outputs.items()}


# One traced inference function per model, kept as long as the model lives.
_INFERENCE = weakref.WeakKeyDictionary()


def _inference_fn(model):
    if isinstance(model, keras.Model):
        # Not `predict_on_batch`: under a strategy of N replicas (Keras 3.15) it gives every
        # replica the whole batch and returns N × the batch. A traced call runs once, in the
        # cross-replica context, on the model's (mirrored) weights.
        if model not in _INFERENCE:
            owner = weakref.ref(model)  # a strong reference here would keep every model alive
            _INFERENCE[model] = tf.function(lambda images: owner()(images, training=False), reduce_retracing=True)
        return _INFERENCE[model]
    if isinstance(model, keras.layers.Layer):
        return lambda images: model(images, training=False)
    if callable(model):
        return model
    raise TypeError(f"`model` must be a Keras model, a layer or a callable. Received: {model!r}")
