"""SavedModels whose signatures take encoded image bytes: the embedder, and embedder + index.

Every export has these signatures (what a TF Serving client sends and receives):

| signature | inputs | outputs |
|---|---|---|
| `serving_default`, `embed` | `images`: string `[None]` (JPEG/PNG/GIF/BMP/WebP bytes) | `embeddings`: float32 `[None, D]` |
| `embed_decoded` | `images`: uint8 `[None, S, S, 3]` (already `resize_and_pad`-ed) | `embeddings`: float32 `[None, D]` |
| `search` (retrieval exports only) | `images`: string `[None]` | `ids`: string `[None, k]`, `scores`: float32 `[None, k]` |

Decoding and `resize_and_pad` (the same ops as training's input pipeline, from
`fgkeras.data.core`) run inside the graph, one image at a time, so a batch may mix
sizes and formats. Embeddings are L2-normalised; `scores` are inner products of
the query embedding with the gallery embeddings (higher = closer), sorted
descending. A ScaNN search that finds fewer than `k` neighbours pads the row with id ""
and score -inf. A request with an element that is not an image fails with
`INVALID_ARGUMENT` naming the element (`images[i] is not an encoded JPEG, PNG, ...`);
an empty batch gives empty outputs.

`k` is fixed at export, not a signature input: TF Serving requires a request to
feed every input of a signature, and a fixed `k` gives the `search` outputs a
static shape. A client that wants fewer neighbours takes a prefix. When the
gallery has fewer than `k` items, `k` is reduced to its size (the export's
`search` outputs are then `[None, N]`; `retrieval_signature_k` reads it back).

Two retrieval flavours:

- `"exact"`: a matrix product with the gallery and `tf.math.top_k`, pure TF ops: the
  SavedModel loads in a stock `tensorflow_model_server`.
- `"scann"`: the ScaNN searcher lives in the graph (`scann_ops`); the SavedModel is saved
  with `namespace_whitelist=["Scann"]` and needs the ScaNN op library to load
  (`load_saved_model` imports it when needed; a model server must be built with the ops).
  Exporting a `ScannIndex` carries *its own* searcher into the graph (`scann_state`: the
  assets ScaNN serialises, so the trained partitioning and codebooks and every upsert since),
  searched with the index's calibrated or tuned settings: the `search` signature answers as
  `index.search` does. Another index (or explicit `scann_config`) gets a searcher trained at
  export from the settings `ScannIndex` would choose.
"""

import logging
import os
import tempfile

import numpy as np
import tensorflow as tf

from fgkeras.data.core import decode_image, resize_and_pad
from fgkeras.export.image_formats import IMAGE_FORMATS, SIGNATURE_LENGTH

logger = logging.getLogger(__name__)

EMBED_SIGNATURES = ("serving_default", "embed")
DECODED_SIGNATURE = "embed_decoded"
SEARCH_SIGNATURE = "search"
FLAVOURS = ("exact", "scann")
SCANN_NAMESPACE = "Scann"


def _check_image_size(image_size):
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive int. Received: image_size={image_size!r}")
    return int(image_size)


def _is_known_image_format(contents):
    """True where the bytes start like one of `image_formats.IMAGE_FORMATS` (the server's table)."""
    contents = tf.strings.join([contents, b"\0" * SIGNATURE_LENGTH])  # substr needs the positions to exist
    matches = [
        tf.reduce_all(tf.stack([tf.strings.substr(contents, offset, len(magic)) == magic
                                for offset, magic in image_format.signatures]))
        for image_format in IMAGE_FORMATS
    ]
    return tf.reduce_any(tf.stack(matches))


def decode_batch(images, image_size):
    """Decodes a `[None]` string batch of encoded images to uint8 `(batch, S, S, 3)`.

    An element that is not an encoded image fails with an `InvalidArgumentError` naming its
    position in the batch; a truncated or damaged file of a known format fails in the
    decoder with TensorFlow's own message. Either way the request fails, not the process.
    """

    def decode_one(element):
        contents, position = element
        check = tf.debugging.Assert(
            _is_known_image_format(contents),
            [tf.strings.format(
                "images[{}] is not an encoded JPEG, PNG, GIF, BMP or WebP image ({} bytes)",
                (position, tf.strings.length(contents)))],
        )
        with tf.control_dependencies([check]):
            return resize_and_pad(decode_image(contents), image_size)

    positions = tf.range(tf.shape(images, out_type=tf.int32)[0])
    return tf.map_fn(
        decode_one, (images, positions),
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
    )


class EmbedderModule(tf.Module):
    """The exported embedder: signatures from encoded bytes and from decoded images.

    Args:
        embedder: an `fgkeras.models.Embedder` (or any Keras model mapping uint8
            `(batch, S, S, 3)` images to `(batch, D)` embeddings).
        image_size: S, the side the images are resized and padded to.
    """

    def __init__(self, embedder, image_size, name=None):
        super().__init__(name=name)
        self.embedder = embedder
        self.image_size = _check_image_size(image_size)
        self.embed = tf.function(
            self._embed, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
        )
        self.embed_decoded = tf.function(
            self._embed_decoded,
            input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8, name="images")],
        )

    def _embeddings(self, images):
        # An empty batch skips the model: some fused CPU kernels reject zero-sized inputs.
        dim = self.embedder.compute_output_shape((None, self.image_size, self.image_size, 3))[-1]
        return tf.cond(
            tf.shape(images)[0] > 0,
            lambda: tf.cast(self.embedder(images, training=False), tf.float32),
            lambda: tf.zeros([0, dim], tf.float32),
        )

    def _embed(self, images):
        return {"embeddings": self._embeddings(decode_batch(images, self.image_size))}

    def _embed_decoded(self, images):
        return {"embeddings": self._embeddings(images)}

    def signatures(self):
        embed = self.embed.get_concrete_function()
        return {"serving_default": embed, "embed": embed,
                DECODED_SIGNATURE: self.embed_decoded.get_concrete_function()}


class RetrievalModule(EmbedderModule):
    """The embedder and a gallery in one graph: adds the `search` signature.

    Args:
        embedder, image_size: as for `EmbedderModule`.
        embeddings: (N, D) float32 gallery embeddings (unit vectors).
        ids: (N,) string ids of the gallery items.
        k: neighbours returned per query; reduced to N when the gallery is smaller.
        flavour: "exact" (matmul + top-k) or "scann" (in-graph ScaNN searcher).
        scann_config: for "scann": None (from the gallery size), a dict of settings or a
            ScaNN text config (see `scann_text_config`), of a searcher trained here.
        scann_index: for "scann", instead: a built `fgkeras.index.ScannIndex` whose own searcher
            the graph carries (see `scann_state`), searched with its settings in use;
            `embeddings` and `ids` must be its own, in its storage order (`index.embeddings`,
            `index.ids`).
    """

    def __init__(self, embedder, image_size, embeddings, ids, k=10, flavour="exact",
                 scann_config=None, name=None, scann_index=None):
        super().__init__(embedder, image_size, name=name)
        embeddings, ids = _check_gallery(embeddings, ids)
        if flavour not in FLAVOURS:
            raise ValueError(f"`flavour` must be one of {FLAVOURS}. Received: flavour={flavour!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be a positive int. Received: k={k!r}")
        if k > len(ids):
            logger.warning("k=%d is larger than the gallery (%d items): the export returns %d neighbours",
                           k, len(ids), len(ids))
        self.k = int(min(k, len(ids)))
        self.flavour = flavour
        self.gallery_ids = tf.Variable(ids, trainable=False, name="gallery_ids")
        if flavour == "exact":
            self.gallery_embeddings = tf.Variable(embeddings, trainable=False, name="gallery_embeddings")
        elif scann_index is not None:
            if scann_config is not None:
                raise ValueError("Give `scann_config` or `scann_index`, not both: the index's searcher has its own.")
            if len(scann_index) != len(ids):
                raise ValueError(f"`scann_index` holds {len(scann_index)} items but the gallery {len(ids)}: "
                                 "export the index's own `embeddings` and `ids`.")
            self.scann_config = None
            self.scann_state = scann_state(scann_index)
            self._scann_arguments = scann_index.search_arguments(self.k)
            # A query whose leaves searched hold fewer than k points is searched again in every leaf
            # (`index.search` completes it with an exact search, which the graph has no gallery for).
            self._scann_every_leaf = scann_index.config.get("num_leaves") if self._scann_arguments[1] != -1 else None
        else:
            from scann.scann_ops.py import scann_ops

            self.scann_config = scann_text_config(embeddings, self.k, scann_config)
            self.scann_state = scann_ops.create_searcher(embeddings, self.scann_config).serialize_to_module()
            self._scann_arguments = (-1, -1)  # the config's own
            self._scann_every_leaf = None
        self.search = tf.function(
            self._search, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
        )

    def _search(self, images):
        queries = self._embeddings(decode_batch(images, self.image_size))
        if self.flavour == "exact":
            scores, indices = tf.math.top_k(
                tf.matmul(queries, self.gallery_embeddings, transpose_b=True), k=self.k
            )
        else:
            from scann.scann_ops.py import scann_ops

            searcher = scann_ops.searcher_from_module(self.scann_state)
            reorder, leaves = self._scann_arguments

            def search(queries, leaves):
                indices, scores = searcher.search_batched(queries, final_num_neighbors=self.k,
                                                          pre_reorder_num_neighbors=reorder, leaves_to_search=leaves)
                return _pad_neighbours(indices, scores, self.k)

            indices, scores = search(queries, leaves)
            if self._scann_every_leaf is not None:
                short = tf.where(tf.reduce_any(tf.logical_or(indices < 0, tf.logical_not(tf.math.is_finite(scores))),
                                               axis=1))

                def complete():
                    again_indices, again_scores = search(tf.gather_nd(queries, short), self._scann_every_leaf)
                    return (tf.tensor_scatter_nd_update(indices, short, again_indices),
                            tf.tensor_scatter_nd_update(scores, short, again_scores))

                indices, scores = tf.cond(tf.size(short) > 0, complete, lambda: (indices, scores))
        valid = tf.logical_and(indices >= 0, tf.math.is_finite(scores))
        ids = tf.where(valid, tf.gather(self.gallery_ids, tf.maximum(indices, 0)), "")
        scores = tf.where(valid, scores, -np.inf)
        return {"ids": tf.ensure_shape(ids, [None, self.k]),
                "scores": tf.ensure_shape(tf.cast(scores, tf.float32), [None, self.k])}

    def signatures(self):
        return {**super().signatures(), SEARCH_SIGNATURE: self.search.get_concrete_function()}


def _pad_neighbours(indices, scores, k):
    """Pads ScaNN results to exactly k columns (index -1) when a search returned fewer."""
    missing = k - tf.shape(indices)[1]
    indices = tf.pad(tf.cast(indices, tf.int32), [[0, 0], [0, missing]], constant_values=-1)
    scores = tf.pad(scores, [[0, 0], [0, missing]], constant_values=-np.inf)
    return indices, scores


def _check_gallery(embeddings, ids):
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(
            f"The gallery embeddings must be a non-empty (N, D) array. Received shape {embeddings.shape}"
        )
    ids = np.asarray([str(i).encode("utf-8") for i in np.asarray(ids).reshape(-1)], dtype=object)
    if len(ids) != len(embeddings):
        raise ValueError(
            f"The gallery has {len(embeddings)} embeddings but {len(ids)} ids; they must match."
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("The gallery embeddings contain NaN or infinite values.")
    return embeddings, ids


# The tensors `scann_ops.ScannState` holds, in its order, and the ScaNN asset that fills each
# (None: `scann_config.pb`, which every searcher has and the asset list does not name).
_SCANN_STATE_ASSETS = (
    ("scann_config", None), ("serialized_partitioner", "PARTITIONER"), ("datapoint_to_token", "TOKENIZATION_NPY"),
    ("ah_codebook", "AH_CENTERS"), ("hashed_dataset", "AH_DATASET_NPY"), ("int8_dataset", "INT8_DATASET_NPY"),
    ("int8_multipliers", "INT8_MULTIPLIERS_NPY"), ("dp_norms", "INT8_NORMS_NPY"), ("dataset", "DATASET_NPY"),
)
_SCANN_STATE_DTYPES = {"datapoint_to_token": np.int32, "hashed_dataset": np.uint8, "int8_dataset": np.int8,
                       "int8_multipliers": np.float32, "dp_norms": np.float32, "dataset": np.float32}


def scann_state(index):
    """The in-graph ScaNN state (`scann_ops.ScannState`) of a `ScannIndex`'s own searcher.

    The searcher's assets (`ScannIndex.write_scann_assets`: the config, the trained partitioning
    and codebooks, each point's leaf and codes, the points) become the tensors that ScaNN's TF ops
    rebuild a searcher from (`scann_ops.searcher_from_module`), as `serialize_to_module` would give
    them for a TF-ops searcher: nothing is retrained, so the graph finds what `index.search` finds.
    A protobuf asset is a (1,) string tensor, an array asset its array; an asset the searcher does
    not have is a scalar, as ScaNN marks it.

    Raises:
        ValueError: the index is empty, or uses an asset ScaNN's TF ops cannot take.
    """
    from google.protobuf import text_format
    from scann.scann_ops import scann_assets_pb2
    from scann.scann_ops.py import scann_ops

    with tempfile.TemporaryDirectory(prefix="fgkeras-scann-") as directory:
        index.write_scann_assets(directory)
        with open(os.path.join(directory, "scann_assets.pbtxt"), encoding="utf-8") as f:
            listed = text_format.Parse(f.read(), scann_assets_pb2.ScannAssets())
        paths = {scann_assets_pb2.ScannAsset.AssetType.Name(asset.asset_type): os.path.join(directory, asset.asset_path)
                 for asset in listed.assets}
        known = {asset for _, asset in _SCANN_STATE_ASSETS}
        if set(paths) - known:
            raise ValueError(f"ScaNN's TF ops cannot take the assets {sorted(set(paths) - known)} of this index.")
        paths[None] = os.path.join(directory, "scann_config.pb")
        tensors = []
        for name, asset in _SCANN_STATE_ASSETS:
            path = paths.get(asset)
            if name in _SCANN_STATE_DTYPES:
                array = np.load(path, allow_pickle=False) if path else np.zeros((), _SCANN_STATE_DTYPES[name])
                tensors.append(tf.constant(array.astype(_SCANN_STATE_DTYPES[name], copy=False)))
            elif path:
                with open(path, "rb") as f:
                    tensors.append(tf.constant([f.read()]))
            else:
                tensors.append(tf.constant(b""))
        return scann_ops.ScannState(tensors)


def scann_text_config(embeddings, k, scann_config=None):
    """The ScaNN text config of a dot-product searcher over the gallery, configured by `ScannIndex`.

    Args:
        embeddings: (N, D) float32 gallery.
        k: default number of neighbours (the reordering keeps at least k candidates).
        scann_config: None (what `ScannIndex` builds for N such vectors before calibrating its
            search-time settings: `ScannIndex.settings_for`), a dict of settings as
            `ScannIndex.config` or `ScannIndex.settings_for` gives them, or a ScaNN text config
            (`ScannBuilder.create_config()`), returned as is.
    """
    from scann.scann_ops.py import scann_ops

    from fgkeras.index.scann_index import MODES, ScannIndex, _unit_norm

    if isinstance(scann_config, str):
        if "distance_measure" not in scann_config:
            raise ValueError(f"`scann_config` is not a ScaNN text config. Received: {scann_config!r:.200}")
        return scann_config
    if scann_config is None:
        settings = ScannIndex().settings_for(len(embeddings), unit_norm=_unit_norm(embeddings))
    elif isinstance(scann_config, dict):
        settings = dict(scann_config)
    else:
        raise ValueError(f"`scann_config` must be None, a dict of settings or a ScaNN text config. "
                         f"Received: {scann_config!r:.200}")
    if settings.get("mode") not in MODES:
        raise ValueError(f"ScaNN `mode` must be one of {MODES}. Received: {settings.get('mode')!r}")
    if settings["mode"] != "brute_force":
        settings["reorder"] = max(settings["reorder"], k)
    builder = scann_ops.builder(embeddings, k, "dot_product")
    return ScannIndex().configure(builder, settings).create_config()


def _save(module, path, flavour="exact"):
    options = tf.saved_model.SaveOptions(namespace_whitelist=[SCANN_NAMESPACE] if flavour == "scann" else None)
    tf.saved_model.save(module, path, signatures=module.signatures(), options=options)
    return path


def export_embedder(embedder, path, image_size):
    """Saves the embedder as a SavedModel with `serving_default`, `embed` and `embed_decoded`.

    Args:
        embedder: an `fgkeras.models.Embedder` (a `MetricLearner`'s `.embedder`).
        path: the SavedModel directory to write.
        image_size: S, the side images are resized and padded to (as in training).
    Returns:
        `path`.
    """
    return _save(EmbedderModule(embedder, image_size), path)


def export_retrieval(embedder, index, path, image_size, k=10, flavour="exact", scann_config=None):
    """Saves embedder + gallery as one SavedModel: the embedder's signatures plus `search`.

    Args:
        embedder: an `fgkeras.models.Embedder`.
        index: the gallery, any object with `.embeddings` ((N, D) float32) and `.ids`
            ((N,) strings), e.g. an `fgkeras.index.ExactIndex` or `ScannIndex`.
        path: the SavedModel directory to write.
        image_size: S, the side images are resized and padded to.
        k: neighbours returned by `search` (fixed at export; see the module docstring).
        flavour: "exact" (pure TF ops) or "scann" (in-graph ScaNN ops).
        scann_config: for "scann": None to carry a `ScannIndex`'s own searcher (see
            `scann_state`) or, for another index, a searcher trained from settings of the gallery
            size; or a dict of settings / a ScaNN text config (see `scann_text_config`) to train
            one of those.
    Returns:
        `path`.
    """
    embeddings, ids = _index_arrays(index)
    dim = getattr(embedder, "embedding_dim", None)
    if dim is not None and embeddings.ndim == 2 and embeddings.shape[1] != dim:
        raise ValueError(
            f"The index holds {embeddings.shape[1]}-d embeddings but the embedder makes {dim}-d ones."
        )
    own = None
    if flavour == "scann" and scann_config is None:
        from fgkeras.index import ScannIndex

        own = index if isinstance(index, ScannIndex) and len(index) else None
    module = RetrievalModule(embedder, image_size, embeddings, ids, k=k, flavour=flavour,
                             scann_config=scann_config, scann_index=own)
    return _save(module, path, flavour)


def _index_arrays(index):
    missing = [name for name in ("embeddings", "ids") if not hasattr(index, name)]
    if missing:
        raise TypeError(
            f"`index` must have `.embeddings` and `.ids` (an fgkeras.index index). "
            f"Received {type(index).__name__} without {missing}"
        )
    return np.asarray(index.embeddings, dtype=np.float32), np.asarray(index.ids)


def load_saved_model(path):
    """`tf.saved_model.load`, registering the ScaNN ops first when the export uses them."""
    if uses_scann_ops(path):
        from scann.scann_ops.py import scann_ops  # noqa: F401  (registers the Scann> ops)
    return tf.saved_model.load(path)


class SavedModelEmbedder:
    """A SavedModel's `embed` signature on encoded images, in batches; finds the corrupt ones.

    What `fgkeras index` and the Beam pipeline (`pipelines.embed_gallery`) embed galleries with: the
    preprocessing the server applies to queries, so gallery and query vectors agree.
    """

    def __init__(self, path, batch_size):
        self._loaded = load_saved_model(path)
        signatures = self._loaded.signatures
        self._function = signatures.get("embed") or signatures["serving_default"]
        (self._input,) = self._function.structured_input_signature[1]
        self.batch_size = batch_size

    def __call__(self, images):
        """(N, D) float32 of a list of encoded images; raises on an undecodable one."""
        outputs = self._function(**{self._input: tf.constant(list(images), tf.string)})
        return np.asarray(outputs.get("embeddings", next(iter(outputs.values()))), np.float32)

    def embed_contents(self, contents):
        """`(good, vectors, corrupt)` of one batch `[(id, path, encoded bytes)]`: the decodable items
        in order and their (len(good), D) vectors (None when there is none), and `[(path, reason)]`
        of the others.

        The batch goes in one call; when one image fails it, each is tried alone to find it.
        """
        try:
            return list(contents), (self([data for _, _, data in contents]) if contents else None), []
        except (tf.errors.InvalidArgumentError, ValueError):  # one bad image fails its batch: find it
            good, rows, corrupt = [], [], []
            for item, path, data in contents:
                try:
                    rows.append(self([data]))
                    good.append((item, path, data))
                except (tf.errors.InvalidArgumentError, ValueError) as error:
                    corrupt.append((path, _reason(error)))
            return good, (np.concatenate(rows) if rows else None), corrupt

    def embed_files(self, files, progress=True):
        """`(ids, embeddings, corrupt)`: the readable images of `[(id, path)]` embedded, in order."""
        from tqdm.auto import tqdm

        ids, blocks, corrupt = [], [], []
        with tqdm(total=len(files), desc="embedding the gallery", unit="image", disable=not progress) as bar:
            for start in range(0, len(files), self.batch_size):
                batch = files[start:start + self.batch_size]
                contents = []
                for item, path in batch:
                    try:
                        with open(path, "rb") as f:
                            contents.append((item, path, f.read()))
                    except OSError as error:
                        corrupt.append((path, f"unreadable: {error.strerror or error}"))
                good, vectors, bad = self.embed_contents(contents)
                corrupt.extend(bad)
                if vectors is not None:
                    ids.extend(item for item, _, _ in good)
                    blocks.append(vectors)
                bar.update(len(batch))
        embeddings = np.concatenate(blocks) if blocks else None
        return ids, embeddings, corrupt


def _reason(error):
    """Why an image failed: the message of the graph's failed assertion (it names what the bytes
    are), else the start of the error."""
    text = " ".join((getattr(error, "message", None) or str(error)).split())
    start = text.find("assertion failed: [")
    if start >= 0:
        text = text[start + len("assertion failed: ["):].split(" [[", 1)[0].removesuffix("]")
    return text[:200]


def uses_scann_ops(path):
    """True when the SavedModel's graph holds ScaNN ops (the "scann" retrieval flavour)."""
    return any(op.startswith(SCANN_NAMESPACE + ">") for op in graph_op_types(path))


def graph_op_types(path):
    """The set of op types in a SavedModel's graph and its functions (what a server must know)."""
    graph = _read_saved_model(path).meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def _read_saved_model(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(tf.io.gfile.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def retrieval_signature_k(path):
    """The `k` of an exported `search` signature, read from the SavedModel (no loading)."""
    outputs = signature_summary(path)[SEARCH_SIGNATURE]["outputs"]
    return outputs["ids"]["shape"][1]


def signature_summary(path):
    """Names, dtypes and shapes of the signatures of a SavedModel, read from saved_model.pb.

    Returns:
        `{signature: {"inputs": {key: {"dtype": "string", "shape": [-1]}}, "outputs": {...}}}`;
        -1 marks an unknown dimension. This is what TF Serving sees.
    """
    proto = _read_saved_model(path)

    def describe(tensors):
        return {
            key: {"dtype": tf.dtypes.as_dtype(info.dtype).name,
                  "shape": [d.size for d in info.tensor_shape.dim]}
            for key, info in sorted(tensors.items())
        }

    signatures = proto.meta_graphs[0].signature_def
    return {
        name: {"inputs": describe(signatures[name].inputs), "outputs": describe(signatures[name].outputs)}
        for name in sorted(signatures) if not name.startswith("__")
    }
