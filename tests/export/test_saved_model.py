import numpy as np
import pytest
import tensorflow as tf

from fgkeras.data.core import decode_image, resize_and_pad
from fgkeras.export import (
    export_embedder,
    export_retrieval,
    load_saved_model,
    retrieval_signature_k,
    signature_summary,
)
from fgkeras.export.saved_model import (
    RetrievalModule,
    decode_batch,
    graph_op_types,
    scann_text_config,
    uses_scann_ops,
)
from fgkeras.index import ExactIndex
from fgkeras.models import build_embedder

SIZE, DIM = 32, 16


def _encode(pixels, fmt):
    return (tf.io.encode_png if fmt == "png" else tf.io.encode_jpeg)(pixels).numpy()


@pytest.fixture(scope="module")
def embedder():
    return build_embedder(width=0.25, embedding_dim=DIM, image_size=SIZE)


@pytest.fixture(scope="module")
def encoded():
    """Six images of different sizes and both formats: the batch a client sends."""
    rng = np.random.default_rng(0)
    shapes = [(40, 50), (32, 32), (20, 64), (64, 20), (33, 47), (50, 40)]
    return [_encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "png" if i % 2 else "jpeg")
            for i, (h, w) in enumerate(shapes)]


@pytest.fixture(scope="module")
def decoded(encoded):
    return np.stack([resize_and_pad(decode_image(b), SIZE).numpy() for b in encoded])


@pytest.fixture(scope="module")
def embedder_export(embedder, tmp_path_factory):
    return export_embedder(embedder, str(tmp_path_factory.mktemp("export") / "embedder"), SIZE)


@pytest.fixture(scope="module")
def loaded(embedder_export):
    return tf.saved_model.load(embedder_export)


@pytest.fixture(scope="module")
def gallery(embedder, decoded):
    index = ExactIndex()
    index.build(np.asarray(embedder(decoded, training=False)), [f"sku-{i}" for i in range(len(decoded))])
    return index


@pytest.fixture(scope="module")
def exact_export(embedder, gallery, tmp_path_factory):
    return export_retrieval(embedder, gallery, str(tmp_path_factory.mktemp("export") / "exact"), SIZE, k=3)


def test_embedder_signatures_names_dtypes_shapes(embedder_export):
    embed = {"inputs": {"images": {"dtype": "string", "shape": [-1]}},
             "outputs": {"embeddings": {"dtype": "float32", "shape": [-1, DIM]}}}
    assert signature_summary(embedder_export) == {
        "serving_default": embed,
        "embed": embed,
        "embed_decoded": {"inputs": {"images": {"dtype": "uint8", "shape": [-1, SIZE, SIZE, 3]}},
                          "outputs": {"embeddings": {"dtype": "float32", "shape": [-1, DIM]}}},
    }


def test_bytes_in_give_the_keras_embeddings_for_any_batch_size(embedder, loaded, encoded, decoded):
    expected = np.asarray(embedder(decoded, training=False))
    for signature in ("serving_default", "embed"):
        out = loaded.signatures[signature](images=tf.constant(encoded))["embeddings"].numpy()
        np.testing.assert_allclose(out, expected, atol=1e-6)
    single = loaded.signatures["embed"](images=tf.constant(encoded[2:3]))["embeddings"].numpy()
    np.testing.assert_allclose(single, expected[2:3], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, rtol=1e-5)


def test_embed_decoded_matches_keras(embedder, loaded, decoded):
    out = loaded.signatures["embed_decoded"](images=tf.constant(decoded[:4]))["embeddings"].numpy()
    np.testing.assert_allclose(out, np.asarray(embedder(decoded[:4], training=False)), atol=1e-6)


def test_empty_batch_gives_empty_embeddings(loaded):
    out = loaded.signatures["embed"](images=tf.constant([], dtype=tf.string))["embeddings"]
    assert out.shape == (0, DIM)


def test_graph_preprocessing_equals_training_preprocessing(encoded, decoded):
    np.testing.assert_array_equal(decode_batch(tf.constant(encoded), SIZE).numpy(), decoded)


@pytest.mark.parametrize("bad, message", [
    (b"definitely not an image", r"images\[1\] is not an encoded JPEG, PNG"),
    (b"", r"images\[1\] is not an encoded JPEG, PNG"),
    ("truncated", r"PNG|JPEG|jpeg|png"),
])
def test_corrupt_bytes_fail_the_request_with_a_clear_error(loaded, encoded, bad, message):
    if bad == "truncated":
        bad = encoded[1][: len(encoded[1]) // 2]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["embed"](images=tf.constant([encoded[0], bad]))
    # the process and the model survive: the next request works
    assert loaded.signatures["embed"](images=tf.constant(encoded[:2]))["embeddings"].shape == (2, DIM)


def test_search_signature_and_results_equal_exact_search(exact_export, embedder, gallery, encoded, decoded):
    summary = signature_summary(exact_export)
    assert summary["search"] == {
        "inputs": {"images": {"dtype": "string", "shape": [-1]}},
        "outputs": {"ids": {"dtype": "string", "shape": [-1, 3]}, "scores": {"dtype": "float32", "shape": [-1, 3]}},
    }
    assert set(summary) == {"serving_default", "embed", "embed_decoded", "search"}
    loaded = tf.saved_model.load(exact_export)
    out = loaded.signatures["search"](images=tf.constant(encoded[:4]))
    ids = out["ids"].numpy().astype(str)
    expected_ids, expected_scores = gallery.search(np.asarray(embedder(decoded[:4], training=False)), k=3)
    np.testing.assert_array_equal(ids, np.asarray(expected_ids).astype(str))
    np.testing.assert_allclose(out["scores"].numpy(), expected_scores, atol=1e-5)
    assert list(ids[:, 0]) == [f"sku-{i}" for i in range(4)]  # each image finds itself first
    assert np.all(np.diff(out["scores"].numpy(), axis=1) <= 0)
    one = loaded.signatures["search"](images=tf.constant(encoded[5:6]))
    assert one["ids"].shape == (1, 3) and one["ids"].numpy()[0, 0] == b"sku-5"
    assert loaded.signatures["search"](images=tf.constant([], tf.string))["ids"].shape == (0, 3)


def test_exact_flavour_needs_no_custom_ops(exact_export):
    """A stock TF Serving runs the exact flavour: every op type in its graph and functions is one
    that TensorFlow itself registers, and none is ScaNN's."""
    from tensorflow.python.framework import op_def_registry

    ops = graph_op_types(exact_export)
    assert "MatMul" in ops or "BatchMatMulV2" in ops
    assert "TopKV2" in ops and "DecodeImage" in ops
    assert [op for op in sorted(ops) if op_def_registry.get(op) is None] == []
    assert not [op for op in ops if "scann" in op.lower()] and not uses_scann_ops(exact_export)


def test_graph_op_types_reads_the_graph_and_the_bodies_of_its_functions(tmp_path):
    """A SavedModel of one known function: the signature's input is a node of the graph, the
    function's own ops are only in the function library."""

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def run(self, x):
            return {"y": tf.math.cumsum(tf.math.softplus(x))}

    module = Module()
    tf.saved_model.save(module, str(tmp_path), signatures={"run": module.run})
    assert {"Placeholder", "Softplus", "Cumsum"} <= graph_op_types(str(tmp_path))
    assert not uses_scann_ops(str(tmp_path))


def test_k_is_read_back_from_an_export(exact_export):
    assert retrieval_signature_k(exact_export) == 3


def test_k_larger_than_the_gallery_is_reduced(embedder, decoded):
    module = RetrievalModule(embedder, SIZE, np.asarray(embedder(decoded[:2], training=False)), ["a", "b"], k=10)
    assert module.k == 2


def test_ids_are_stored_as_utf8(embedder):
    module = RetrievalModule(embedder, SIZE, np.eye(3, DIM), ["sku-1", "Škoda Octavia", 42], k=1)
    assert [i.decode("utf-8") for i in module.gallery_ids.numpy()] == ["sku-1", "Škoda Octavia", "42"]


def test_retrieval_refuses_a_gallery_of_another_dimension(embedder, tmp_path):
    index = ExactIndex()
    index.build(np.eye(4, DIM + 1, dtype=np.float32), list("abcd"))
    with pytest.raises(ValueError, match=f"{DIM + 1}-d embeddings but the embedder makes {DIM}-d"):
        export_retrieval(embedder, index, str(tmp_path / "bad"), SIZE)


def test_retrieval_refuses_an_unknown_flavour(embedder, gallery, tmp_path):
    with pytest.raises(ValueError, match="`flavour` must be one of"):
        export_retrieval(embedder, gallery, str(tmp_path / "bad"), SIZE, flavour="faiss")


def test_scann_settings_are_the_scann_index_settings():
    pytest.importorskip("scann")
    from scann.scann_ops.py import scann_ops

    from fgkeras.index import ScannIndex

    def index_config(embeddings, k, settings):
        return ScannIndex().configure(scann_ops.builder(embeddings, k, "dot_product"), settings).create_config()

    unit = np.tile(np.eye(2, dtype=np.float32), (50_000, 1))
    for embeddings, unit_norm, mode in ((np.zeros((19_999, 2), np.float32), False, "brute_force {"),
                                        (np.zeros((20_000, 2), np.float32), False, "asymmetric_hash {"),
                                        (unit, True, "partitioning_type: SPHERICAL"),
                                        (2 * unit, False, "partitioning_type: GENERIC")):
        settings = ScannIndex().settings_for(len(embeddings), unit_norm=unit_norm)
        text = scann_text_config(embeddings, 10)
        assert text == index_config(embeddings, 10, settings) and mode in text
    # Given settings are used as they are, but reorder at least the k neighbours returned.
    settings = ScannIndex(mode="ah", reorder=40).settings_for(20_000)
    text = scann_text_config(unit[:20_000], 10, settings)
    assert text == index_config(unit[:20_000], 10, settings) and "approx_num_neighbors: 40" in text
    assert "approx_num_neighbors: 64" in scann_text_config(unit[:20_000], 64, settings)


def _recall(found, exact):
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)]))


def _mutated_scann_index(queries, mode, rng):
    """A ScaNN index of points around `queries`, with upserts and deletes since its training."""
    from fgkeras.index import ScannIndex

    vectors = queries[rng.integers(0, len(queries), 4000)] + 0.02 * rng.normal(size=(4000, queries.shape[1]))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    index = ScannIndex(mode=mode, num_leaves=40 if mode == "tree" else None, rebalance_fraction=None)
    index.build(vectors[:3500], [f"sku-{i}" for i in range(3500)])
    index.upsert([f"sku-{i}" for i in range(3500, 4000)], vectors[3500:])  # hashed into the trained tree
    index.delete([f"sku-{i}" for i in range(0, 3500, 9)])
    return index


@pytest.mark.parametrize("mode", ["brute_force", "ah", "tree"])
def test_scann_state_rebuilds_the_index_own_searcher(mode):
    pytest.importorskip("scann")
    from scann.scann_ops.py import scann_ops

    from fgkeras.export.saved_model import scann_state

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(50, DIM)).astype(np.float32)
    index = _mutated_scann_index(centres / np.linalg.norm(centres, axis=1, keepdims=True), mode, rng)
    queries = index.embeddings[rng.integers(0, len(index), 200)] + 0.01 * rng.normal(size=(200, DIM))
    queries = queries.astype(np.float32)
    reorder, leaves = index.search_arguments(10)
    state = scann_state(index)  # the searcher lives as long as its state
    searcher = scann_ops.searcher_from_module(state)
    rows, scores = searcher.search_batched(queries, final_num_neighbors=10, pre_reorder_num_neighbors=reorder,
                                           leaves_to_search=leaves)
    own_ids, own_scores = index.search(queries, k=10)
    rebuilt = index.ids[rows.numpy()]
    # The same answers: a query whose searched leaves hold fewer than k points is completed by the
    # index with an exact search, so it may differ in its last places (rare: 1 query of 200 seen).
    same = (rebuilt == own_ids).all(axis=1)
    assert same.mean() >= 0.98, f"{(~same).sum()} of {len(same)} queries differ"
    assert _recall(rebuilt, own_ids) >= 0.99
    np.testing.assert_allclose(scores.numpy()[same], own_scores[same], atol=1e-5)


def test_the_exported_scann_search_is_the_index_own_searcher(embedder, encoded, decoded, tmp_path):
    """The index's trained tree, codebooks, mutations and calibrated settings are what the graph
    searches with: the exported `search` answers as `index.search` does, not as a tree retrained."""
    pytest.importorskip("scann")
    from scann.scann_ops.py import scann_ops

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (60, SIZE, SIZE, 3), dtype=np.uint8)
    index = _mutated_scann_index(np.asarray(embedder(pixels, training=False)), "tree", rng)
    index.upsert([f"image-{i}" for i in range(len(decoded))], np.asarray(embedder(decoded, training=False)))
    assert index.config["mode"] == "tree"
    assert scann_text_config(index.embeddings, 5, index.config) == index.configure(
        scann_ops.builder(index.embeddings, 5, "dot_product")).create_config()
    path = export_retrieval(embedder, index, str(tmp_path / "scann"), SIZE, k=10, flavour="scann")
    assert signature_summary(path)["search"]["outputs"]["ids"] == {"dtype": "string", "shape": [-1, 10]}
    assert uses_scann_ops(path)
    loaded = load_saved_model(path)
    out = loaded.signatures["search"](images=tf.constant(encoded))
    # what the index itself answers to the graph's own queries (an approximate tree may miss an item's
    # own image; the export must miss it exactly when the index does)
    own_ids, own_scores = index.search(loaded.signatures["embed"](images=tf.constant(encoded))["embeddings"].numpy(),
                                       k=10)
    assert list(out["ids"].numpy().astype(str)[:, 0]) == list(own_ids[:, 0].astype(str))
    np.testing.assert_allclose(out["scores"].numpy()[:, 0], own_scores[:, 0], atol=1e-3)
    assert np.all(np.diff(out["scores"].numpy(), axis=1) <= 1e-6)
    assert loaded.signatures["search"](images=tf.constant(encoded[:2]))["ids"].shape == (2, 10)
    images = tf.constant([_encode(p, "png") for p in pixels])
    exported = loaded.signatures["search"](images=images)["ids"].numpy().astype(str)
    queries = loaded.signatures["embed"](images=images)["embeddings"].numpy()  # exactly the graph's queries
    own = index.search(queries, k=10)[0].astype(str)
    exact = ExactIndex().build(index.embeddings, index.ids).search(queries, k=10)[0].astype(str)
    assert abs(_recall(exported, exact) - _recall(own, exact)) <= 0.01
    assert _recall(exported, own) >= 0.99  # the same answers, not merely as good ones


def test_a_scann_search_short_of_k_in_its_leaves_is_completed_in_every_leaf(embedder):
    """Leaves of ~10 points, one searched, k = 30: every query comes up short, and is searched again
    in every leaf (the index completes it exactly) instead of being padded with ""."""
    pytest.importorskip("scann")
    from fgkeras.index import ScannIndex

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    centres = rng.normal(size=(40, DIM))
    vectors = (centres[rng.integers(0, 40, 400)] + 0.1 * rng.normal(size=(400, DIM))).astype(np.float32)
    index = ScannIndex(mode="tree", num_leaves=40, num_leaves_to_search=1, reorder=60, calibration_recall=None)
    index.build(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [f"sku-{i}" for i in range(400)])
    module = RetrievalModule(embedder, SIZE, index.embeddings, index.ids, k=30, flavour="scann", scann_index=index)
    encoded = tf.constant([_encode(p, "png") for p in pixels])
    found = module.search(encoded)["ids"].numpy().astype(str)
    queries = module.embed(encoded)["embeddings"].numpy()
    assert not (found == "").any()
    assert _recall(found, index.search(queries, k=30)[0].astype(str)) >= 0.95
