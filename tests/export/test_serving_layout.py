import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from fgkeras.export import (
    export_and_push,
    export_embedder,
    latest_version,
    list_versions,
    next_version,
    push,
    read_model_card,
    read_warmup_requests,
    signature_summary,
    write_warmup_requests,
)
from fgkeras.export.serving_layout import bless, build_model_card, write_model_card
from fgkeras.index import ExactIndex
from fgkeras.models import build_embedder

SIZE, DIM = 32, 16


@pytest.fixture(scope="module")
def embedder():
    return build_embedder(width=0.25, embedding_dim=DIM, image_size=SIZE)


@pytest.fixture(scope="module")
def candidate(embedder, tmp_path_factory):
    """An exported embedder with warmup requests and no model card yet."""
    path = export_embedder(embedder, str(tmp_path_factory.mktemp("candidate") / "export"), SIZE)
    write_warmup_requests(path, model_name="cars")
    return path


def _with_card(candidate, directory, metrics):
    path = str(directory)
    shutil.copytree(candidate, path)
    write_model_card(path, build_model_card(path, "cars", metrics=metrics))
    return path


def test_versions_are_the_integer_directories(tmp_path):
    root = tmp_path / "cars"
    assert (latest_version(str(root)), next_version(str(root)), list_versions(str(root))) == (None, 1, [])
    for entry in ("1", "10", "2", ".staging-abc", "tmp", "3.bak"):
        (root / entry).mkdir(parents=True)
    (root / "11").write_text("a file, not a version")
    assert list_versions(str(root)) == [1, 2, 10]
    assert latest_version(str(root)) == 10
    assert next_version(str(root)) == 11


def test_only_plain_decimal_names_are_versions(tmp_path, caplog):
    root = tmp_path / "cars"
    # "²" and "٣" are digits to str.isdigit (int("²") raises; int("٣") is 3, whose path "3" does not
    # exist); "007" would be read as 7 whose path "7" does not exist; 2^63 is no ModelSpec version
    for entry in ("0", "3", "²", "٣", "007", "00", str(2 ** 63), str(2 ** 63 - 1), "1e3", "-1", " 4"):
        (root / entry).mkdir(parents=True)
    with caplog.at_level("WARNING", logger="fgkeras.export.serving_layout"):
        assert list_versions(str(root)) == [0, 3, 2 ** 63 - 1]
    warned = {record.args[1] for record in caplog.records}
    assert warned == {"²", "٣", "007", "00", str(2 ** 63)}
    assert all(os.path.isdir(root / str(v)) for v in list_versions(str(root)))
    caplog.clear()
    ignored = set()
    with caplog.at_level("WARNING", logger="fgkeras.export.serving_layout"):
        for _ in range(3):  # a poller warns once per name
            assert latest_version(str(root), ignored) == 2 ** 63 - 1
    assert len(caplog.records) == 5 and ignored == warned


def test_warmup_file_is_a_tfrecord_of_predict_requests_for_every_signature(candidate):
    logs = read_warmup_requests(candidate)
    signatures = signature_summary(candidate)
    assert 0 < len(logs) <= 1000
    assert {log.predict_log.request.model_spec.signature_name for log in logs} == set(signatures)
    assert all(log.predict_log.request.model_spec.name == "cars" for log in logs)
    loaded = tf.saved_model.load(candidate)
    batch_sizes = set()
    for log in logs:  # replay every request through the export, as TF Serving does at load time
        request = log.predict_log.request
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        assert set(inputs) == set(signatures[request.model_spec.signature_name]["inputs"])
        out = loaded.signatures[request.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        embeddings = out["embeddings"].numpy()
        assert embeddings.shape == (len(inputs["images"]), DIM) and np.all(np.isfinite(embeddings))
        batch_sizes.add(len(inputs["images"]))
    assert batch_sizes == {1, 2}


def test_corrupt_warmup_file_does_not_parse(candidate, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(candidate, broken)
    path = os.path.join(broken, "assets.extra", "tf_serving_warmup_requests")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    with pytest.raises(tf.errors.DataLossError):
        read_warmup_requests(broken)


def test_gate_pushes_better_and_refuses_worse_candidates(candidate, tmp_path):
    root = str(tmp_path / "saved_models" / "cars")

    first = push(_with_card(candidate, tmp_path / "c1", {"recall@1": 0.50}), root)
    assert first.pushed and first.version == 1 and "no version is serving" in first.reason
    card = read_model_card(first.path)
    assert card["version"] == 1 and card["metrics"]["recall@1"] == 0.50 and card["blessing"]["metric"] == "recall@1"

    worse = push(_with_card(candidate, tmp_path / "c2", {"recall@1": 0.45}), root)
    assert not worse.pushed and not worse
    assert worse.version == 1 and worse.path is None
    assert "not blessed" in worse.reason and "0.4500" in worse.reason and "0.5000" in worse.reason
    assert list_versions(root) == [1]
    assert sorted(os.listdir(root)) == ["1"]  # no staging directory left behind

    within = push(_with_card(candidate, tmp_path / "c3", {"recall@1": 0.48}), root, threshold=0.05)
    assert within.pushed and within.version == 2 and within.baseline_value == 0.50

    better = push(_with_card(candidate, tmp_path / "c4", {"recall@1": 0.49}), root)  # compared with v2
    assert better.pushed and better.version == 3
    assert os.path.isfile(os.path.join(better.path, "saved_model.pb"))
    assert read_warmup_requests(better.path)  # the warmup file travels with the version


def test_given_metrics_override_the_card_and_lower_is_better_works(candidate, tmp_path):
    root = str(tmp_path / "cars")
    assert push(candidate, root, metrics={"loss": 0.3}, metric="loss", greater_is_better=False).version == 1
    assert read_model_card(os.path.join(root, "1"))["metrics"] == {"loss": 0.3}
    refused = push(candidate, root, metrics={"loss": 0.4}, metric="loss", greater_is_better=False)
    assert not refused.pushed and "<= 0.3000" in refused.reason
    assert push(candidate, root, metrics={"loss": 0.2}, metric="loss", greater_is_better=False).version == 2


def test_serving_version_without_the_metric_is_not_silently_replaced(candidate, tmp_path):
    root = str(tmp_path / "cars")
    shutil.copytree(candidate, os.path.join(root, "4"))  # pushed by hand, no model card
    refused = push(candidate, root, metrics={"recall@1": 0.9})
    assert not refused.pushed and refused.version == 4 and "has no 'recall@1'" in refused.reason
    forced = push(candidate, root, metrics={"recall@1": 0.9}, force=True)
    assert forced.pushed and forced.version == 5
    assert read_model_card(forced.path)["blessing"]["forced"] is True


def test_bless_rejects_nan_and_missing_metrics():
    assert bless({"recall@1": float("nan")}, None)[0] is False
    with pytest.raises(ValueError, match="no 'recall@1' metric"):
        bless({"map@r": 0.4}, None)
    with pytest.raises(ValueError, match="threshold"):
        bless({"recall@1": 0.4}, None, threshold=-0.1)


def test_a_push_that_fails_while_renaming_leaves_no_version(candidate, tmp_path, monkeypatch):
    root = str(tmp_path / "cars")

    def crash(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        push(candidate, root, metrics={"recall@1": 0.5})
    assert list_versions(root) == [] and os.listdir(root) == []


def test_export_and_push_writes_a_complete_version(embedder, tmp_path, umask_022):
    root = str(tmp_path / "saved_models" / "cars")
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(5, DIM)).astype(np.float32)
    index = ExactIndex()
    index.build(gallery / np.linalg.norm(gallery, axis=1, keepdims=True), [f"sku-{i}" for i in range(5)])
    result = export_and_push(embedder, root, SIZE, metrics={"recall@1": 0.4, "map@r": 0.2}, index=index, k=3,
                             data={"source": "synthetic", "split": "unseen"}, config={"train": {"epochs": 1}})
    assert result.pushed and result.version == 1 and result.path == os.path.join(root, "1")
    assert_readable_by_another_user(result.path)
    card = read_model_card(result.path)
    assert card["name"] == "cars" and card["version"] == 1
    assert card["model"] == {"kind": "retrieval", "image_size": SIZE, "embedding_dim": DIM, "class": "Embedder",
                             "flavour": "exact", "index_size": 5, "index_class": "ExactIndex", "k": 3}
    assert card["data"]["split"] == "unseen" and card["config"]["train"]["epochs"] == 1
    assert {"tensorflow", "keras", "fgkeras"} <= set(card["versions"])
    assert card["versions"]["tensorflow"] == tf.__version__
    assert card["signatures"]["search"]["outputs"]["ids"]["shape"] == [-1, 3]
    markdown = open(os.path.join(result.path, "assets.extra", "model_card.md")).read()
    assert "| recall@1 | 0.4000 |" in markdown and "`search`" in markdown
    json.dumps(card)  # plain JSON
    signatures = {log.predict_log.request.model_spec.signature_name for log in read_warmup_requests(result.path)}
    assert signatures == {"serving_default", "embed", "embed_decoded", "search"}

    refused = export_and_push(embedder, root, SIZE, metrics={"recall@1": 0.3})
    assert not refused.pushed and list_versions(root) == [1] and os.listdir(root) == ["1"]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def assert_readable_by_another_user(directory):
    """Folders 0755 and files 0644 (what a umask of 022 makes), the version directory included."""
    found, expected = {}, {}
    for folder, _, names in os.walk(directory):
        for path, mode in [(folder, 0o755)] + [(os.path.join(folder, name), 0o644) for name in names]:
            found[os.path.relpath(path, directory)] = os.stat(path).st_mode & 0o777
            expected[os.path.relpath(path, directory)] = mode
    assert found == expected


def test_a_pushed_version_is_readable_by_another_user(candidate, tmp_path, umask_022):
    private = str(tmp_path / "private")
    shutil.copytree(candidate, private)
    for folder, _, names in os.walk(private):  # as written by a process of umask 077
        os.chmod(folder, 0o700)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o600)
    result = push(private, str(tmp_path / "cars"), metrics={"recall@1": 0.5})
    assert result.pushed and os.path.isfile(os.path.join(result.path, "saved_model.pb"))
    assert_readable_by_another_user(result.path)


def test_a_push_fsyncs_every_file_and_folder_before_the_rename(candidate, tmp_path, monkeypatch):
    synced, rename = [], os.rename

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    def renamed(source, target):
        expected = {os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names}
        expected |= {folder for folder, _, _ in os.walk(source)}
        assert expected <= set(synced)
        rename(source, target)

    monkeypatch.setattr(os, "fsync", record)
    monkeypatch.setattr(os, "rename", renamed)
    assert push(candidate, str(tmp_path / "cars"), metrics={"recall@1": 0.5}).pushed
    assert str(tmp_path / "cars") in synced  # the new entry of the root
