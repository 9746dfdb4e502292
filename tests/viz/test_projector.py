import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector as tb_projector

from fgkeras.viz import projector


def _read_config(log_dir):
    with open(os.path.join(log_dir, "projector_config.pbtxt")) as f:
        return text_format.Parse(f.read(), tb_projector.ProjectorConfig())


def test_tensorboard_finds_the_embeddings_labels_and_thumbnails(tmp_path):
    embeddings = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    images = np.stack([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)])  # one flat colour each
    log_dir = str(tmp_path / "projector")
    projector.write_projector(log_dir, embeddings, {"label": [3, 3, 7, 7, 9], "view": ["a", "b", "c", "d", "e"]},
                              images, thumbnail=4)

    embedding, = _read_config(log_dir).embeddings
    # The tensor as the projector reads it: the latest checkpoint of the log directory, by name.
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
    np.testing.assert_array_equal(reader.get_tensor(embedding.tensor_name), embeddings)
    rows = open(os.path.join(log_dir, embedding.metadata_path)).read().splitlines()
    assert rows == ["label\tview", "3\ta", "3\tb", "7\tc", "7\td", "9\te"]
    assert list(embedding.sprite.single_image_dim) == [4, 4]
    sprite = tf.io.decode_png(open(os.path.join(log_dir, embedding.sprite.image_path), "rb").read()).numpy()
    assert sprite.shape == (12, 12, 3)  # a 3 × 3 grid for 5 images
    for i in range(5):  # row-major: image i at grid row i // 3, column i % 3
        row, column = divmod(i, 3)
        assert (sprite[4 * row:4 * row + 4, 4 * column:4 * column + 4] == 40 * i).all()
    assert (sprite[8:, 8:] == 0).all()  # the unused cell


def test_one_column_has_no_header_and_a_large_grid_shrinks_its_thumbnails(tmp_path, monkeypatch):
    log_dir = str(tmp_path)
    projector.write_projector(log_dir, np.eye(2), {"label": ["x\ty", "z"]})
    assert open(os.path.join(log_dir, "metadata.tsv")).read() == "x y\nz\n"
    assert not _read_config(log_dir).embeddings[0].sprite.image_path
    monkeypatch.setattr(projector, "MAX_SPRITE_SIDE", 20)  # TensorBoard's limit, scaled down
    sprite, side = projector.sprite_image(np.zeros((10, 9, 9, 3), np.uint8), thumbnail=32)
    assert side == 5 and sprite.shape == (20, 20, 3)  # 4 × 4 cells of 5 px


@pytest.mark.parametrize("embeddings, metadata, images, message", [
    (np.zeros((2, 3)), {"label": [1]}, None, "metadata column 'label' has 1 values for 2"),
    (np.zeros((2, 3)), {"label": [1, 2]}, np.zeros((3, 4, 4, 3), np.uint8), "3 images for 2 embeddings"),
    (np.zeros(3), {}, None, "non-empty \\(N, D\\) array"),
])
def test_mismatched_inputs_are_refused(tmp_path, embeddings, metadata, images, message):
    with pytest.raises(ValueError, match=message):
        projector.write_projector(str(tmp_path), embeddings, metadata, images)
