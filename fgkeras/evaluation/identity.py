"""Evaluation of view transformation (ViewGAN, Sec. 4): identity, view, truth distance, few-shot.

- `identity_preservation`: a feature extractor trained on the train classes embeds real images
  of N_c unseen classes; a KNN (`fgkeras.index.ExactIndex`, cosine) is fitted on 80 % of them,
  and the other 20 % are each turned into every target view by G; the rows report the top-1 /
  top-5 of the generated images, the view accuracy of an independent view classifier on them
  (identity without the requested view is what copying the input gives), and the distance of
  each generated image to the renderer's true image of the same instance in the target view
  (pixels: mean |·| / 255; features: 1 - cosine in the extractor's space).
- `few_shot`: N_c classes, s real images per class for training, all the rest for testing; a
  classifier on [pooled feature, real/fake bit] trained without and with G's augmentation
  (interpolated view codes, bit 0 for generated images, 1 for real ones and at test time);
  accuracy mean ± 95 % interval (1.96 standard errors) over repeated random splits.

KNN top-k: the k nearest *distinct classes* among the neighbours, best first (1-NN for top-1).
"""

import logging

import keras
import numpy as np

from fgkeras.index import ExactIndex

logger = logging.getLogger(__name__)


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_images(model, images, batch_size=64):
    """`model(images)` in inference mode, batch by batch, as float32 numpy (N, D)."""
    images = np.asarray(images, np.float32)
    out = [keras.ops.convert_to_numpy(model(images[i:i + batch_size], training=False))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


def knn_top_k(gallery, gallery_labels, queries, query_labels, ks=(1, 5)):
    """KNN classification accuracy of `queries`: `{"top1": …, "top5": …}` for `ks` (1, 5).

    The gallery is an `ExactIndex` of L2-normalised features (cosine); a query's ranked classes
    are the distinct labels of its nearest neighbours in order.
    """
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    if len(gallery) != len(gallery_labels) or len(queries) != len(query_labels):
        raise ValueError(f"Features and labels must have the same length. Received: gallery {len(gallery)} / "
                         f"{len(gallery_labels)} labels, queries {len(queries)} / {len(query_labels)} labels")
    index = ExactIndex().build(_unit(gallery), [str(i) for i in range(len(gallery))])
    ids, _ = index.search(_unit(queries), k=len(gallery))
    neighbours = gallery_labels[ids.astype(np.int64)]
    result = {}
    for k in ks:
        hits = 0
        for row, label in zip(neighbours, query_labels):
            _, first = np.unique(row, return_index=True)
            ranked = row[np.sort(first)][:k]
            hits += int(label in ranked)
        result[f"top{k}"] = hits / max(len(query_labels), 1)
    return result


def train_feature_extractor(images, labels, epochs=5, batch_size=32, backbone="resnet18", width=0.5,
                            embedding_dim=128, learning_rate=1e-3, seed=0):
    """The identity feature extractor of Sec. 4.2: an `Embedder` (ResNet-18 by default) trained
    with a softmax head (`build_baseline("softmax")`) on the train classes' real images.

    Args:
        images, labels: real images (N, S, S, 3) in [0, 255] and their class ids (remapped to
            0 … K - 1 here).
        epochs, batch_size, learning_rate: of the Adam training.
        backbone, width, embedding_dim: see `fgkeras.models.build_embedder`.
    Returns: the trained `Embedder` (L2-normalised embeddings).
    """
    from fgkeras.models import build_baseline, build_embedder

    keras.utils.set_random_seed(seed)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    embedder = build_embedder(backbone, width=width, embedding_dim=embedding_dim, image_size=np.shape(images)[1])
    learner = build_baseline("softmax", embedder, num_classes=len(classes), seed=seed)
    learner.compile(optimizer=keras.optimizers.Adam(learning_rate))
    learner.fit(np.asarray(images, np.float32), y.astype(np.int32), epochs=epochs, batch_size=batch_size, verbose=0)
    return embedder


def build_view_classifier(image_size, num_views, width=16):
    """A small CNN image → view logits, independent of G and D (the view-accuracy judge)."""
    return keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.Rescaling(1 / 127.5, offset=-1.0),
        *[layer for i in range(4) for layer in (
            keras.layers.Conv2D(width * 2**min(i, 2), 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(), keras.layers.ReLU())],
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_views),
    ], name="view_classifier")


def train_view_classifier(images, views, num_views, epochs=5, batch_size=32, learning_rate=1e-3, seed=0):
    """`build_view_classifier` trained on real `images` and their `views` (softmax, Adam)."""
    keras.utils.set_random_seed(seed)
    model = build_view_classifier(np.shape(images)[1], num_views)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(np.asarray(images, np.float32), np.asarray(views), epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def view_accuracy(classifier, images, views, batch_size=64):
    """Fraction of `images` that `classifier` puts in `views`."""
    predicted = embed_images(classifier, images, batch_size).argmax(axis=1)
    return float(np.mean(predicted == np.asarray(views)))


def _split(labels, classes, fraction, rng):
    """Per class, a random `fraction` of its images for the gallery, the rest as queries."""
    gallery, queries = [], []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        gallery.extend(members[:cut])
        queries.extend(members[cut:])
    return np.array(gallery), np.array(queries)


def identity_preservation(transform, extractor, view_classifier, arrays, num_classes=(20,), train_fraction=0.8,
                          seed=0, batch_size=64):
    """Identity preservation, view accuracy and truth distance of a view transformer (Sec. 4.2).

    Args:
        transform: `images, view ids -> images` (e.g. `ViewTransformGAN.transform`), or None for
            the real images themselves (the identity row: queries untransformed, views as drawn).
        extractor: an image → feature model trained on the train classes (e.g. an `Embedder`).
        view_classifier: an image → view logits model trained on real images.
        arrays: `fgkeras.data.views.render_views` of the unseen split (every instance in every view).
        num_classes: the N_c to evaluate at (each capped at the classes present).
        train_fraction: the KNN's share of each class's real images.
    Returns: one dict per N_c: num_classes, top1, top5, view_accuracy, pixel_distance,
    feature_distance, queries (generated images scored).
    """
    rng = np.random.default_rng(seed)
    labels, views = arrays["label"], arrays["view"]
    num_views = len(arrays["views"])
    features = embed_images(extractor, arrays["image"], batch_size)
    rows = []
    for n in num_classes:
        classes = rng.choice(np.unique(labels), size=min(n, len(np.unique(labels))), replace=False)
        gallery, queries = _split(labels, classes, train_fraction, rng)
        source = np.repeat(queries, num_views)
        targets = np.tile(np.arange(num_views), len(queries))
        truth = source - views[source] + targets  # the same instance in the target view
        if transform is None:
            generated = arrays["image"][source].astype(np.float32)
        else:
            generated = np.asarray(transform(arrays["image"][source], targets), np.float32)
        generated_features = embed_images(extractor, generated, batch_size)
        row = {"num_classes": len(classes), **knn_top_k(features[gallery], labels[gallery], generated_features,
                                                          labels[source])}
        row["view_accuracy"] = view_accuracy(view_classifier, generated, targets, batch_size)
        row["pixel_distance"] = float(np.mean(np.abs(generated - arrays["image"][truth].astype(np.float32))) / 255)
        row["feature_distance"] = float(np.mean(1 - np.sum(_unit(generated_features) * _unit(features[truth]), axis=1)))
        row["queries"] = len(generated)
        rows.append(row)
    return rows


def build_few_shot_classifier(image_size, num_classes, width=16):
    """A CNN on [pooled feature, real/fake bit] → N_c logits (the paper's ResNet-18 with the bit).

    Inputs: [image (batch, S, S, 3) in [0, 255], bit (batch, 1): 1 real, 0 generated].
    """
    image = keras.Input((image_size, image_size, 3), name="image")
    bit = keras.Input((1,), name="real")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(image)
    for i in range(4):
        x = keras.layers.Conv2D(width * 2**min(i, 3), 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(num_classes)(keras.layers.Concatenate()([pooled, bit]))
    return keras.Model([image, bit], logits, name="few_shot_classifier")


def _train_and_test(train_images, train_labels, train_bits, test_images, test_labels, num_classes, steps, seed,
                    batch_size=32):
    keras.utils.set_random_seed(seed)
    model = build_few_shot_classifier(train_images.shape[1], num_classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.integers(len(train_images), size=batch_size)
        model.train_on_batch([train_images[index], train_bits[index]], train_labels[index])
    logits = np.concatenate([keras.ops.convert_to_numpy(model([test_images[i:i + 256],
                                                                np.ones((len(test_images[i:i + 256]), 1), np.float32)],
                                                               training=False))
                             for i in range(0, len(test_images), 256)])
    return float(np.mean(logits.argmax(axis=1) == test_labels))


def mean_interval(values):
    """(mean, half-width of the 95 % interval: 1.96 standard errors; 0 for one value)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def few_shot(augment, arrays, num_classes=20, shots=(5, 10), repeats=3, steps=300, seed=0):
    """The few-shot protocol of Sec. 4.3 without and with augmentation.

    Args:
        augment: `images -> (generated, source index, codes)` (e.g. `ViewTransformGAN.augment`
            with its `per_image`), or None for the "without" rows only.
        arrays: `render_views` of the unseen split.
        num_classes: N_c (capped at the classes present).
        shots: the s real training images per class.
        repeats: random splits per s.
        steps: classifier training steps of 32 images (the same with and without augmentation).
    Returns: one dict per s: shots, num_classes, without (mean, ±), with (mean, ±) or None,
    runs (the accuracies of every split).
    """
    rng = np.random.default_rng(seed)
    labels = arrays["label"]
    all_classes = np.unique(labels)
    rows = []
    for s in shots:
        without, with_augment = [], []
        for repeat in range(repeats):
            classes = rng.choice(all_classes, size=min(num_classes, len(all_classes)), replace=False)
            remap = {int(c): i for i, c in enumerate(classes)}
            train, test = [], []
            for c in classes:
                members = rng.permutation(np.flatnonzero(labels == c))
                train.extend(members[:s])
                test.extend(members[s:])
            train, test = np.array(train), np.array(test)
            y = np.array([remap[int(c)] for c in labels[train]], np.int32)
            y_test = np.array([remap[int(c)] for c in labels[test]], np.int32)
            images = arrays["image"][train].astype(np.float32)
            test_images = arrays["image"][test].astype(np.float32)
            run_seed = seed * 1000 + s * 10 + repeat
            without.append(_train_and_test(images, y, np.ones((len(y), 1), np.float32), test_images, y_test,
                                           len(classes), steps, run_seed))
            if augment is not None:
                generated, source, _ = augment(images)
                all_images = np.concatenate([images, np.asarray(generated, np.float32)])
                all_labels = np.concatenate([y, y[source]])
                bits = np.concatenate([np.ones((len(y), 1)), np.zeros((len(source), 1))]).astype(np.float32)
                with_augment.append(_train_and_test(all_images, all_labels, bits, test_images, y_test,
                                                    len(classes), steps, run_seed))
            logger.info("few-shot %d-shot split %d: without %.3f%s", s, repeat, without[-1],
                        f", with {with_augment[-1]:.3f}" if with_augment else "")
        rows.append({"shots": s, "num_classes": len(classes), "without": mean_interval(without),
                     "with": mean_interval(with_augment) if with_augment else None,
                     "runs": {"without": without, "with": with_augment}})
    return rows


def format_identity_rows(rows_by_model):
    """A Markdown table: model, N_c, top-1, top-5, view accuracy, pixel and feature distance to the truth."""
    lines = ["| model | N_c | top-1 % | top-5 % | view acc. % | pixel dist. | feature dist. |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in rows_by_model.items():
        for r in rows:
            lines.append(f"| {name} | {r['num_classes']} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | "
                         f"{100 * r['view_accuracy']:.1f} | {r['pixel_distance']:.3f} | {r['feature_distance']:.3f} |")
    return "\n".join(lines)


def format_few_shot_rows(rows):
    """A Markdown table: N_c-way s-shot accuracy without and with augmentation (mean ± 95 %)."""
    lines = ["| setting | without augmentation % | with augmentation % |", "| --- | --- | --- |"]
    for r in rows:
        with_text = "—" if r["with"] is None else f"{100 * r['with'][0]:.1f} ± {100 * r['with'][1]:.1f}"
        lines.append(f"| {r['num_classes']}-way {r['shots']}-shot | {100 * r['without'][0]:.1f} ± "
                     f"{100 * r['without'][1]:.1f} | {with_text} |")
    return "\n".join(lines)


__all__ = [
    "build_few_shot_classifier",
    "train_feature_extractor",
    "build_view_classifier",
    "embed_images",
    "few_shot",
    "format_few_shot_rows",
    "format_identity_rows",
    "identity_preservation",
    "knn_top_k",
    "mean_interval",
    "train_view_classifier",
    "view_accuracy",
]
