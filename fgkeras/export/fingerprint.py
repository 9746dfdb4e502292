"""Which model made a set of vectors: the record an index keeps of the SavedModel that embedded it.

Vectors belong to the model version that made them: a query embedded by one version must never be
searched against another version's vectors, even when both have the same dimension. Every index
built for a served version (`indexes/<name>/<version>/`, beside `saved_models/<name>/<version>/`)
records `model_record(...)` in its metadata, and the server pairs a version with an index only
when the two records agree.
"""

import hashlib
import os

FINGERPRINT_FILE = "fingerprint.pb"


def model_fingerprint(export_dir):
    """A string that changes whenever the weights, the graph or the signatures of a SavedModel change.

    TensorFlow's own fingerprint (`fingerprint.pb`, written by every `tf.saved_model.save` since
    TF 2.12: hashes of the graph, the signatures, the object graph and the checkpoint) when the
    export has one; otherwise a SHA-256 of `saved_model.pb` and the variables files.
    """
    export_dir = os.fspath(export_dir)
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise ValueError(f"`export_dir` must be a SavedModel directory (no saved_model.pb). "
                         f"Received: export_dir={export_dir!r}")
    if os.path.isfile(os.path.join(export_dir, FINGERPRINT_FILE)):
        import tensorflow as tf

        return "tf:" + tf.saved_model.experimental.read_fingerprint(export_dir).singleprint()
    digest = hashlib.sha256()
    files = ["saved_model.pb"]
    variables = os.path.join(export_dir, "variables")
    if os.path.isdir(variables):
        files += [os.path.join("variables", name) for name in sorted(os.listdir(variables))]
    for relative in files:
        digest.update(relative.encode() + b"\0")
        with open(os.path.join(export_dir, relative), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def model_record(export_dir, name, version):
    """`{"name", "version", "fingerprint"}` of the SavedModel at `export_dir`: what an index stores."""
    return {"name": str(name), "version": int(version), "fingerprint": model_fingerprint(export_dir)}
