"""The Beam pipeline against the same SavedModel called in-process: same ids, same vectors, same top-k."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip(
    "apache_beam",
    reason="apache-beam is not installed here: it needs protobuf < 7, the serving stack protobuf 7, so the "
           "pipeline's tests run in an environment of their own (README, pipelines/requirements.txt; "
           ".ci/run runs them)")

import tensorflow as tf  # noqa: E402

from fgkeras.data.sources import gallery_files  # noqa: E402
from fgkeras.export import export_embedder, model_record  # noqa: E402
from fgkeras.index import ExactIndex, Index, ScannIndex  # noqa: E402
from fgkeras.models import build_embedder  # noqa: E402
from pipelines import embed_gallery  # noqa: E402

SIZE, DIM = 32, 16
BROKEN = os.path.join("c1", "broken.jpg")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    embedder = build_embedder(width=0.25, embedding_dim=DIM, image_size=SIZE)
    path = tmp_path_factory.mktemp("models") / "saved_models" / "tiny" / "1"
    return export_embedder(embedder, str(path), SIZE)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """3 classes × 5 PNG / JPEG images of mixed sizes, and one file that is not an image."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / f"c{c}")
        for i in range(5):
            pixels = rng.integers(0, 256, (SIZE + 4 * i, SIZE, 3), dtype=np.uint8)
            data = (tf.io.encode_png if i % 2 else tf.io.encode_jpeg)(pixels).numpy()
            (root / f"c{c}" / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(data)
    (root / BROKEN).write_bytes(b"\xff\xd8 not a jpeg at all")
    return str(root)


@pytest.fixture(scope="module")
def expected(model_dir, gallery):
    """`(ids, embeddings)` of the readable images: the SavedModel's `embed` signature called in-process."""
    files = [(item, path) for item, path in gallery_files(gallery) if item != BROKEN]
    embed = tf.saved_model.load(model_dir).signatures["embed"]
    contents = [open(path, "rb").read() for _, path in files]
    vectors = np.concatenate([embed(images=tf.constant(contents[i:i + 4]))["embeddings"].numpy()
                              for i in range(0, len(contents), 4)])
    order = np.argsort([item for item, _ in files])
    return [files[i][0] for i in order], vectors[order]


def _run(model_dir, images, out, **kwargs):
    return embed_gallery.run(model_dir, images, str(out), num_shards=3, batch_size=4, **kwargs)


@pytest.fixture(scope="module")
def direct(model_dir, gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("direct")
    return out, _run(model_dir, gallery, out)


@pytest.fixture(scope="module")
def multi_processing(model_dir, gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    return out, _run(model_dir, gallery, out,
                     beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])


def _top_k(index_dir, expected, k=5):
    ids, vectors = expected
    queries = vectors[::2] + 0.05 * np.random.default_rng(1).standard_normal(vectors[::2].shape).astype(np.float32)
    reference = ExactIndex().build(vectors, ids).search(queries, k=k)[0]
    return Index.load(index_dir).search(queries, k=k)[0], reference


def test_embeddings_and_ids_equal_the_saved_model_in_process(direct, expected):
    out, report = direct
    ids, vectors = embed_gallery.read_embeddings(str(out))
    assert ids == expected[0]
    np.testing.assert_allclose(vectors, expected[1], rtol=1e-5, atol=1e-5)
    assert report.embedded == len(expected[0]) == 15


def test_a_corrupt_image_goes_to_the_dead_letters_with_its_name_and_is_counted(direct, gallery):
    out, report = direct
    assert report.dead_letters == 1
    (record,) = report.dead_letter_records
    assert record["path"] == os.path.join(gallery, BROKEN)
    assert record["reason"].startswith("images[0] is not an encoded JPEG, PNG")
    (path,) = report.dead_letter_files
    with open(path) as f:
        assert [json.loads(line) for line in f] == [record]
    assert BROKEN not in Index.load(report.index).ids.tolist()


def test_an_earlier_runs_outputs_are_not_mixed_with_a_new_run(direct, model_dir, gallery):
    out, _ = direct
    with pytest.raises(ValueError, match="outputs of an earlier run"):
        _run(model_dir, gallery, out)


def test_merged_index_gives_the_top_k_of_an_exact_index_built_in_process(direct, expected, model_dir):
    _, report = direct
    found, reference = _top_k(report.index, expected)
    np.testing.assert_array_equal(found, reference)
    merged = ExactIndex.load(report.index)
    assert merged.metadata["model"] == model_record(model_dir, "tiny", 1)
    shards = [ExactIndex.load(path) for path in report.index_shards]
    assert 1 < len(shards) <= 3
    assert sorted(i for shard in shards for i in shard.ids) == expected[0]
    assert all(embed_gallery.shard_of(i, 3) == shard.metadata["shard"] for shard in shards for i in shard.ids)


def test_multi_processing_direct_runner_gives_the_same_result(multi_processing, expected):
    out, report = multi_processing
    ids, vectors = embed_gallery.read_embeddings(str(out))
    assert ids == expected[0]
    np.testing.assert_allclose(vectors, expected[1], rtol=1e-5, atol=1e-5)
    assert (report.embedded, report.dead_letters, len(report.dead_letter_records)) == (15, 1, 1)
    found, reference = _top_k(report.index, expected)
    np.testing.assert_array_equal(found, reference)


def test_tfrecord_input_and_a_scann_index(model_dir, gallery, expected, tmp_path):
    records = embed_gallery.write_image_tfrecords(gallery, tmp_path / "gallery.tfrecord")
    report = _run(model_dir, records, tmp_path / "out", kind="scann")
    ids, vectors = embed_gallery.read_embeddings(str(tmp_path / "out"))
    assert ids == expected[0]
    np.testing.assert_allclose(vectors, expected[1], rtol=1e-5, atol=1e-5)
    assert [r["path"] for r in report.dead_letter_records] == [f"{records}:{BROKEN}"]
    assert isinstance(Index.load(report.index), ScannIndex)
    found, reference = _top_k(report.index, expected, k=1)
    np.testing.assert_array_equal(found, reference)


def test_csv_input_and_a_file_that_cannot_be_read(model_dir, gallery, expected, tmp_path):
    rows = [f"{item},{item.split(os.sep)[0]}" for item, _ in gallery_files(gallery)] + ["c0/missing.jpg,c0"]
    csv_path = os.path.join(gallery, "gallery.csv")
    with open(csv_path, "w") as f:
        f.write("path,class_id\n" + "\n".join(rows) + "\n")
    try:
        report = _run(model_dir, csv_path, tmp_path / "out")
    finally:
        os.remove(csv_path)
    ids, vectors = embed_gallery.read_embeddings(str(tmp_path / "out"))
    assert ids == expected[0]
    np.testing.assert_allclose(vectors, expected[1], rtol=1e-5, atol=1e-5)
    reasons = {r["path"]: r["reason"] for r in report.dead_letter_records}
    assert sorted(reasons) == [os.path.join(gallery, "c0", "missing.jpg"), os.path.join(gallery, BROKEN)]
    assert reasons[os.path.join(gallery, "c0", "missing.jpg")].startswith("unreadable")
    assert report.dead_letters == 2


def test_merge_refuses_shards_of_two_models(tmp_path):
    vectors = np.eye(4, dtype=np.float32)
    for name, version, rows in (("a", 1, slice(0, 2)), ("a", 2, slice(2, 4))):
        shard = ExactIndex().build(vectors[rows], [f"{version}-{i}" for i in range(2)])
        shard.metadata = {"model": {"name": name, "version": version, "fingerprint": str(version)}, "shard": version}
        shard.save(tmp_path / f"shard-{version}")
    with pytest.raises(ValueError, match="different models"):
        embed_gallery.merge_index_shards([str(tmp_path / "shard-1"), str(tmp_path / "shard-2")], str(tmp_path / "m"))
    merged = embed_gallery.merge_index_shards([str(tmp_path / "shard-1")], str(tmp_path / "m"))
    assert merged.metadata == {"model": {"name": "a", "version": 1, "fingerprint": "1"}}


def test_ids_that_differ_in_a_character_or_two_spread_over_every_shard():
    """Short sequential file names: CRC-32 (linear) leaves two of four shards empty with these."""
    ids = [f"c{c}/{i}.png" for c in range(4) for i in range(10)]
    counts = np.bincount([embed_gallery.shard_of(item, 4) for item in ids], minlength=4)
    assert counts.min() >= 0.5 * len(ids) / 4, counts
