"""The files of an embedded gallery, one format whoever writes them: the Beam pipeline
(`pipelines.embed_gallery`) or the retrieval pipeline's in-process embedding.

    embeddings/embeddings-SSSSS-of-NNNNN.tfrecord   tf.train.Example {"id": bytes, "embedding": floats}
    dead_letter/dead_letter-SSSSS-of-NNNNN.jsonl    {"path", "reason"} of each image not read or decoded

This module needs TensorFlow and numpy only (never Apache Beam), so both writers share it.
"""

import json
import os

import numpy as np

EMBEDDINGS_DIR, DEAD_LETTER_DIR = "embeddings", "dead_letter"
ID_FEATURE = "id"
EMBEDDING_FEATURE = "embedding"


def shard_name(prefix, shard, num_shards, suffix):
    """`<prefix>-SSSSS-of-NNNNN<suffix>`: the names Beam's file sinks give their shards."""
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}{suffix}"


def to_example(item, vector):
    """The serialized `tf.train.Example` of one embedded image."""
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        ID_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode("utf-8")])),
        EMBEDDING_FEATURE: tf.train.Feature(float_list=tf.train.FloatList(value=vector)),
    })).SerializeToString()


def read_embedding_files(files):
    """`(ids, embeddings)` of embedding files, sorted by id: (N,) strings and (N, D) float32."""
    import tensorflow as tf

    ids, rows = [], []
    for record in tf.data.TFRecordDataset(list(files)).as_numpy_iterator():
        features = tf.train.Example.FromString(record).features.feature
        ids.append(features[ID_FEATURE].bytes_list.value[0].decode("utf-8"))
        rows.append(np.asarray(features[EMBEDDING_FEATURE].float_list.value, np.float32))
    order = np.argsort(ids, kind="stable")
    return [ids[i] for i in order], (np.stack(rows)[order] if rows else np.empty((0, 0), np.float32))


def write_local(out, ids, embeddings, dead_letters):
    """Writes one embeddings file (rows in id order) and one dead-letter file under the local folder `out`.

    Args:
        ids, embeddings: the embedded images' ids and (N, D) vectors.
        dead_letters: `[(path, reason)]` of the images that could not be read or decoded.
    Returns:
        `(embeddings_file, dead_letter_file)`.
    """
    import tensorflow as tf

    embeddings_file = os.path.join(out, EMBEDDINGS_DIR, shard_name("embeddings", 0, 1, ".tfrecord"))
    dead_file = os.path.join(out, DEAD_LETTER_DIR, shard_name("dead_letter", 0, 1, ".jsonl"))
    os.makedirs(os.path.dirname(embeddings_file), exist_ok=True)
    os.makedirs(os.path.dirname(dead_file), exist_ok=True)
    with tf.io.TFRecordWriter(embeddings_file) as writer:
        for row in np.argsort(ids, kind="stable"):
            writer.write(to_example(ids[row], embeddings[row]))
    with open(dead_file, "w", encoding="utf-8") as f:
        for path, reason in dead_letters:
            f.write(json.dumps({"path": path, "reason": reason}) + "\n")
    return embeddings_file, dead_file
