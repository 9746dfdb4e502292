"""TFLite embedders (fp32, dynamic-range, int8) and their parity with the Keras model.

A TFLite embedder takes **decoded** images: input `images` uint8 `[batch, S, S, 3]` with values
in [0, 255] (the batch dimension is dynamic), output `embeddings` float32 `[batch, D]`, L2-
normalised. TFLite's builtin ops cannot decode JPEG/PNG (that would need the Flex delegate, i.e.
the TensorFlow runtime the edge app is avoiding), so the caller decodes and resizes with the
same ops as training and the SavedModel (`fgkeras.data.core.decode_image` and
`resize_and_pad`, or the platform's decoder followed by the same letterboxing).

Modes:

- `"fp32"`: float weights and activations. Parity with Keras ~1e-7.
- `"dynamic"`: int8 weights, float activations (dynamic-range quantization); no calibration.
- `"int8"`: int8 weights and activations in the backbone, calibrated on `representative_images`
  (full-integer post-training quantization). The embedding head — every op after global
  pooling, i.e. whose output is `(batch, features)`: pooling, the embedding `Dense` (with its
  BatchNormalization folded in) and the L2 normalisation — stays in float
  (`float_head=True`): fully quantized, the normalised output is int8 with a fixed scale of
  1/128, so embeddings are no longer unit vectors (norms off by up to ~2 %), and a per-tensor
  int8 embedding loses the small differences fine-grained retrieval ranks by. The float head
  costs a few microseconds.

Two TFLite conversion traps are avoided here, and the tests would catch them:

- the L2 normalisation is written so that TFLite does not fuse it into its L2_NORMALIZATION
  builtin, whose norm floor is a fixed 1e-6 instead of the layer's epsilon (see
  `_unfused_l2_normalize`);
- the variables are frozen into constants (`from_concrete_functions` without a trackable
  object): with the trackable object, TF 2.20's converter keeps Keras 3 variables as resource
  variables that are never initialised in the interpreter, and the model silently returns NaN.
"""

import functools
import logging
import os
import warnings

import numpy as np
import tensorflow as tf

from fgkeras._files import write_atomic
from fgkeras.data.core import resize_and_pad

logger = logging.getLogger(__name__)

MODES = ("fp32", "dynamic", "int8")
_DEFAULT_CALIBRATION_IMAGES = 300
# tf.lite.Interpreter's notice that it moves to the ai_edge_litert package (not installed here).
_INTERPRETER_NOTICE = r"(?s).*tf\.lite\.Interpreter is deprecated"
# The converter's advice to pass the trackable object, which we do not on purpose (module docstring).
_TRACKABLE_NOTICE = "Please consider providing the trackable_obj"


def _without_trackable_notice(convert):
    """`convert` with the converter's trackable-object advice dropped from the "absl" logger."""

    def without_notice(record):
        return _TRACKABLE_NOTICE not in record.getMessage()

    @functools.wraps(convert)
    def wrapped(*args, **kwargs):
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(without_notice)
        try:
            return convert(*args, **kwargs)
        finally:
            absl_logger.removeFilter(without_notice)

    return wrapped


def _inference_function(embedder, image_size):
    normalize = _unfused_l2_normalize(embedder, image_size)

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
    def embed(images):
        if normalize is None:
            return {"embeddings": tf.cast(embedder(images, training=False), tf.float32)}
        return {"embeddings": normalize(tf.cast(embedder.features(images, training=False), tf.float32))}

    return embed.get_concrete_function()


def _unfused_l2_normalize(embedder, image_size):
    """The embedder's L2 normalisation written so that TFLite keeps it as plain ops, or None.

    TFLite fuses `x * rsqrt(max(sum(square(x)), eps²))` into its L2_NORMALIZATION builtin, which
    clamps the norm at a fixed 1e-6 instead of the layer's epsilon (1e-12): features smaller than
    that come out far from unit length (an untrained MobileNet embedder, features ~1e-8, gave
    TFLite norms of 0.001–0.004). `x * x` instead of `square(x)` is not matched by the fusion, so
    the TFLite graph computes exactly what `L2Normalize` computes (MUL, SUM, MAXIMUM, RSQRT, MUL).
    Embedders without `features()` and an `l2_normalize` layer, or whose output is not
    `l2_normalize(features(x))` (checked on a probe batch), are converted as they are.
    """
    layer = getattr(embedder, "l2_normalize", None)
    if not hasattr(embedder, "features") or layer is None or getattr(layer, "axis", -1) != -1:
        return None
    epsilon_squared = float(layer.epsilon) ** 2

    def normalize(features):
        squared_norm = tf.reduce_sum(features * features, axis=-1, keepdims=True)
        return features * tf.math.rsqrt(tf.maximum(squared_norm, epsilon_squared))

    probe = np.random.default_rng(0).integers(0, 256, (2, image_size, image_size, 3), dtype=np.uint8)
    expected = np.asarray(embedder(probe, training=False), dtype=np.float32)
    rebuilt = normalize(tf.cast(embedder.features(probe, training=False), tf.float32)).numpy()
    if rebuilt.shape != expected.shape or not np.allclose(rebuilt, expected, atol=1e-5):
        logger.warning("%s is not l2_normalize(features(x)); converting its call as it is (TFLite's fused "
                       "L2_NORMALIZATION floors norms at 1e-6)", type(embedder).__name__)
        return None
    return normalize


def _prepare_images(images, image_size, name):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"`{name}` must be a non-empty (N, H, W, 3) image array. Received shape {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        images = np.stack([resize_and_pad(tf.convert_to_tensor(image, tf.uint8), image_size).numpy()
                           for image in images.astype(np.uint8)])
    return images.astype(np.uint8)


def head_node_names(model_content):
    """Output tensor names of the ops that act on `(batch, features)`: the embedding head."""
    interpreter = _interpreter(model_content=model_content)
    tensors = interpreter.get_tensor_details()
    return [tensors[op["outputs"][0]]["name"] for op in interpreter._get_ops_details()  # noqa: SLF001
            if len(tensors[op["outputs"][0]]["shape_signature"]) <= 2]


@_without_trackable_notice
def convert_tflite(embedder, image_size, mode="fp32", representative_images=None, float_head=True,
                   max_calibration_images=_DEFAULT_CALIBRATION_IMAGES):
    """The TFLite flatbuffer (bytes) of an embedder; see `export_tflite`."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive int. Received: image_size={image_size!r}")
    function = _inference_function(embedder, int(image_size))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    if mode == "fp32":
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic":
        return converter.convert()

    if representative_images is None:
        raise ValueError("mode='int8' needs `representative_images` to calibrate the activation ranges.")
    calibration = _prepare_images(representative_images, int(image_size), "representative_images")
    if len(calibration) > max_calibration_images:
        calibration = calibration[np.linspace(0, len(calibration) - 1, max_calibration_images).astype(int)]
    logger.info("calibrating int8 activations on %d images", len(calibration))

    def representative_dataset():
        for image in calibration:
            yield [image[None]]

    converter.representative_dataset = representative_dataset
    with warnings.catch_warnings():
        # The uint8 image input is cast to float in the graph: it needs no quantization statistics.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        warnings.filterwarnings("ignore", message=_INTERPRETER_NOTICE)  # the debugger's interpreters
        if not float_head:
            return converter.convert()
        float_nodes = head_node_names(tf.lite.TFLiteConverter.from_concrete_functions([function]).convert())
        # Selective quantization: the debugger's converter quantizes all but the denylisted nodes.
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative_dataset,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=float_nodes),
        )
        return debugger.get_nondebug_quantized_model()


def export_tflite(embedder, path, image_size, mode="fp32", representative_images=None, float_head=True,
                  max_calibration_images=_DEFAULT_CALIBRATION_IMAGES):
    """Converts the embedder to a TFLite file.

    Args:
        embedder: an `fgkeras.models.Embedder`.
        path: the `.tflite` file to write.
        image_size: S; the TFLite input is uint8 `[batch, S, S, 3]` (decoded and
            `resize_and_pad`-ed images: TFLite cannot decode JPEG/PNG).
        mode: "fp32", "dynamic" (int8 weights) or "int8" (int8 weights and activations).
        representative_images: for "int8": uint8 (N, H, W, 3) images like the ones served
            (training images, not the evaluation set), resized to S when needed.
        float_head: for "int8": keep pooling, the embedding layer and the L2 normalisation
            in float (see the module docstring). False quantizes every op.
        max_calibration_images: calibrate on at most this many (evenly spaced) images.
    Returns:
        `path`.
    """
    content = convert_tflite(embedder, image_size, mode, representative_images, float_head, max_calibration_images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, content)  # a reader (or a crash) sees the old file or the new one, never a part
    return path


def export_tflite_variants(embedder, directory, image_size, representative_images, modes=MODES, prefix="embedder"):
    """Writes `<directory>/<prefix>_<mode>.tflite` for each mode; returns `{mode: path}`."""
    return {
        mode: export_tflite(embedder, os.path.join(directory, f"{prefix}_{mode}.tflite"), image_size, mode=mode,
                            representative_images=representative_images if mode == "int8" else None)
        for mode in modes
    }


def _interpreter(model_path=None, model_content=None, num_threads=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_INTERPRETER_NOTICE)
        return tf.lite.Interpreter(model_path=model_path, model_content=model_content, num_threads=num_threads)


class TFLiteEmbedder:
    """Runs a TFLite embedder on uint8 image batches.

    Args:
        model_path: a `.tflite` file from `export_tflite` (or `model_content`: its bytes).
        num_threads: interpreter threads (None: TFLite's default).

    Calling it maps uint8 `(batch, S, S, 3)` images to float32 `(batch, D)` embeddings.
    """

    def __init__(self, model_path=None, model_content=None, num_threads=None):
        if (model_path is None) == (model_content is None):
            raise ValueError("Pass exactly one of `model_path` and `model_content`.")
        self.interpreter = _interpreter(model_path, model_content, num_threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.image_size = int(self._input["shape_signature"][1])
        self.embedding_dim = int(self._output["shape_signature"][-1])
        self._batch_size = None

    @property
    def op_names(self):
        """The set of TFLite op names in the model (e.g. to check for L2_NORMALIZATION)."""
        return {op["op_name"] for op in self.interpreter._get_ops_details()}  # noqa: SLF001

    def __call__(self, images):
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"`images` must have shape (batch, {', '.join(map(str, expected))}). "
                             f"Received shape {images.shape}")
        if images.dtype != self._input["dtype"]:
            images = np.clip(np.round(images), 0, 255).astype(self._input["dtype"])
        if len(images) != self._batch_size:
            self.interpreter.resize_tensor_input(self._input["index"], images.shape)
            self.interpreter.allocate_tensors()
            self._batch_size = len(images)
        self.interpreter.set_tensor(self._input["index"], images)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self._output["index"]), dtype=np.float32)

    def embed(self, images, batch_size=64):
        """Embeds any number of images, `batch_size` at a time."""
        images = np.asarray(images)
        return np.concatenate([self(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _batched(embed, images, batch_size):
    return np.concatenate([np.asarray(embed(images[i:i + batch_size]), dtype=np.float32)
                           for i in range(0, len(images), batch_size)])


def _nearest_neighbours(embeddings):
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def tflite_parity(embedder, tflite_paths, images, labels, saved_model=None, batch_size=64, num_threads=None):
    """How close TFLite embedders are to the Keras embedder, and what it costs in retrieval.

    Args:
        embedder: the Keras embedder the files were converted from (the reference).
        tflite_paths: a `.tflite` path, or `{name: path}` for several variants.
        images: uint8 (N, S, S, 3) decoded evaluation images.
        labels: (N,) class ids, for Recall@1 (leave-one-out over the N images).
        saved_model: optionally the embedder's SavedModel directory (`export_embedder`): its
            `embed_decoded` signature is run on the same images and compared too.
        batch_size: images per call.
        num_threads: TFLite interpreter threads.
    Returns:
        `{"reference": {"recall@1", "num_images"}, name: {"max_abs_diff", "mean_abs_diff",
        "max_norm_error", "nn_agreement", "recall@1", "recall@1_drop"}, ...}`, all against the
        Keras embeddings, where `max_norm_error` = max |‖e‖ − 1| and `nn_agreement` is the
        fraction of images whose nearest neighbour is the one the reference finds. With
        `saved_model`, an entry "saved_model" of the same form, and each TFLite entry gains
        "max_abs_diff_vs_saved_model".
    """
    from fgkeras.evaluation import retrieval_metrics

    if isinstance(tflite_paths, (str, os.PathLike)):
        tflite_paths = {os.path.splitext(os.path.basename(tflite_paths))[0]: tflite_paths}
    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"`images` ({len(images)}) and `labels` ({len(labels)}) must have the same length.")
    reference = _batched(lambda x: embedder(x, training=False), images, batch_size)
    reference_recall = float(retrieval_metrics(reference, labels)["recall@1"])
    neighbours = _nearest_neighbours(reference)

    def compare(embeddings):
        finite = bool(np.all(np.isfinite(embeddings)))
        recall = float(retrieval_metrics(embeddings, labels)["recall@1"]) if finite else float("nan")
        difference = np.abs(embeddings - reference)
        return {
            "max_abs_diff": float(difference.max()),
            "mean_abs_diff": float(difference.mean()),
            "max_norm_error": float(np.abs(np.linalg.norm(embeddings, axis=1) - 1.0).max()),
            "nn_agreement": float(np.mean(_nearest_neighbours(embeddings) == neighbours)) if finite else 0.0,
            "recall@1": recall,
            "recall@1_drop": reference_recall - recall,
        }

    report = {"reference": {"recall@1": reference_recall, "num_images": len(images)}}
    saved = None
    if saved_model is not None:
        from fgkeras.export.saved_model import DECODED_SIGNATURE, load_saved_model

        signature = load_saved_model(saved_model).signatures[DECODED_SIGNATURE]
        saved = _batched(lambda x: signature(images=tf.constant(x))["embeddings"], images, batch_size)
        report["saved_model"] = compare(saved)
    for name, path in tflite_paths.items():
        embeddings = TFLiteEmbedder(path, num_threads=num_threads).embed(images, batch_size)
        report[name] = compare(embeddings)
        if saved is not None:
            report[name]["max_abs_diff_vs_saved_model"] = float(np.abs(embeddings - saved).max())
    return report
